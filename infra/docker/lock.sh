#!/bin/sh
# Regenerate constraints.txt (the exact versions both images install) from requirements.in,
# for the images' Python 3.11 on linux x86_64:  sh infra/docker/lock.sh
# CUDA libraries and triton are left out: each image takes them from its own torch wheel index
# (CPU wheels need none; the cu128 wheels bring their own).
set -eu
cd "$(dirname "$0")"
{
  sed -n '2,5p' lock.sh
  uv pip compile requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --no-header --no-annotate --quiet \
    | grep -v -E '^(-e |nvidia-|cuda-|triton==)'
} > constraints.txt
