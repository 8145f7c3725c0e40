"""Large CPU activation buffers on transparent huge pages.

A training step's biggest fresh buffers (the [T, V] logits: 64 MiB at 2048 x 8192 fp32) are
past glibc's mmap threshold (32 MiB at most), so every step maps them anew and first-touches
them 4 KiB at a time: ~16k page faults, tens of ms on a small CPU machine. Backed by 2 MiB
pages (madvise(MADV_HUGEPAGE), Linux THP) the same buffer takes a few dozen faults. madvise is
a hint: where THP is off this is the anonymous mapping malloc would have made anyway.
"""

from __future__ import annotations

import math
import mmap

import torch

MIN_BYTES = 2 * 2**20  # one huge page
_SUPPORTED = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")


def empty(
    shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Uninitialised tensor on `like`'s device (and dtype unless given), on huge pages when
    that is the CPU and it is large."""
    dtype = dtype or like.dtype
    nbytes = math.prod(shape) * dtype.itemsize
    if like.device.type != "cpu" or not _SUPPORTED or nbytes < max(MIN_BYTES, 1):
        return torch.empty(shape, dtype=dtype, device=like.device)
    # Private: a shared anonymous mapping is shmem, which THP leaves alone.
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    # The tensor holds the mapping alive; it is unmapped when the tensor is freed.
    return torch.frombuffer(buf, dtype=dtype).view(shape)
