"""The dataset fingerprint: the name of its folder and the key of the cache.

It hashes everything that decides the output bytes: the input listing (path,
size, mtime or ETag), the resolved config less runtime-only keys, the
tokenizer's identity, ``FORMAT_VERSION`` and, for an incremental build, the
fingerprint of the dataset it extends. Touching an input file changes
its mtime and so the fingerprint: a cautious miss, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.config import PrepareConfig
from pipeline.manifest import FORMAT_VERSION
from pipeline.sources import SourceFile

LENGTH = 16


def fingerprint(
    sources: list[SourceFile],
    cfg: PrepareConfig,
    tokenizer_identity: str,
    base: str | None = None,
) -> str:
    """``base``: the fingerprint of the dataset an incremental build extends."""
    payload = {
        "format_version": FORMAT_VERSION,
        "sources": [s.listing_entry() for s in sources],
        "config": cfg.fingerprint_view(),
        "tokenizer": tokenizer_identity,
    }
    if base is not None:
        payload["base"] = base
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:LENGTH]
