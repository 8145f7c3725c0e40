"""The default dataset name, read off the inputs: ``alice.txt`` lands in ``datasets/alice/``.

A name is a folder under ``datasets/``, so it keeps to ``[A-Za-z0-9._-]``; it is
not part of the fingerprint's meaning (the inputs are), only where the
dataset is found by a person and by incremental builds of the same inputs.
"""

from __future__ import annotations

import posixpath
import re

from pipeline.formats import COMPRESSIONS, FORMATS

_GLOB = re.compile(r"[*?\[\]{}]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSIONS = tuple(COMPRESSIONS) + tuple(FORMATS)
MAX_LEN = 64


def input_stem(uri: str) -> str:
    """``/data/alice.txt.gz`` -> ``alice``; ``s3://b/corpus/`` -> ``corpus``;
    ``hf://datasets/org/name`` -> ``name``; ``books/*.txt`` -> ``books``."""
    path = uri.split("://", 1)[-1].rstrip("/")
    parts = [p for p in path.split("/") if p and not _GLOB.search(p)]
    last = parts[-1] if parts else ""
    if posixpath.basename(path) == last:  # a file: its extensions are not its name
        while last.lower().endswith(_EXTENSIONS):
            last = last[: last.rfind(".")]
    return _UNSAFE.sub("-", last).strip("-._")


def default_name(inputs: list[str]) -> str:
    """One input's stem, or the first one's with how many more: ``alice-and-2-more``."""
    stems = list(dict.fromkeys(s for s in map(input_stem, inputs) if s))
    if not stems:
        return "dataset"
    name = stems[0] if len(stems) == 1 else f"{stems[0]}-and-{len(stems) - 1}-more"
    return name[:MAX_LEN].rstrip("-._") or "dataset"
