"""The content hashes of a dataset's kept documents, kept beside its shards.

An incremental build dedups its new documents against everything its base
kept; the shards hold tokens, not text, so the hashes are stored. Each build
writes the hashes of the documents it added (``doc_hashes.npy``, int64 in
document order, 8 bytes a document) and its manifest lists that file plus its
base's entries, each with its sha256, like shards.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np

from pipeline.config import S3Options
from pipeline.errors import ChecksumError
from pipeline.storage import join, read_bytes, resolve, write_bytes_atomic

FILE = "doc_hashes.npy"


def write_doc_hashes(dataset_uri: str, hashes: np.ndarray, s3: S3Options | None) -> dict[str, Any]:
    """Store ``hashes`` and return the manifest entry naming them."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(hashes, np.int64), allow_pickle=False)
    data = buf.getvalue()
    write_bytes_atomic(join(dataset_uri, FILE), data, s3)
    return {"path": FILE, "count": len(hashes), "sha256": hashlib.sha256(data).hexdigest()}


def read_doc_hashes(dataset_uri: str, manifest: dict[str, Any], s3: S3Options | None) -> np.ndarray:
    """Every kept document's hash, over the dataset and the bases it reuses; checksums verified."""
    parts = [np.empty(0, np.int64)]
    for entry in manifest.get("doc_hashes", []):
        try:
            data = read_bytes(resolve(dataset_uri, entry["path"]), s3)
        except FileNotFoundError:
            raise ChecksumError(f"{entry['path']} of {dataset_uri} is missing") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ChecksumError(
                f"{entry['path']} of {dataset_uri}: sha256 does not match the manifest"
            )
        hashes = np.load(io.BytesIO(data), allow_pickle=False)
        assert len(hashes) == entry["count"], entry
        parts.append(hashes)
    return np.concatenate(parts)
