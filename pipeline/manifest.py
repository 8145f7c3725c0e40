"""``manifest.json``: the dataset's table of contents and its commit marker.

Written last, after every shard and the tokenizer have landed, so a dataset
folder without one is an unfinished run that nothing must read.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from pipeline.config import S3Options
from pipeline.errors import ManifestError
from pipeline.storage import exists, join, read_bytes, remove, write_bytes_atomic

# 2: mixtures (``data.sources``): shards tagged with their ``source``, under
# ``{split}/{source}/``, and a ``mixture`` list. A version-1 reader would train on a
# mixture as one pool, ignoring its weights, hence the bump; version 1 is still read
# (it is a dataset of one source).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(dataset_uri: str, manifest: dict[str, Any], s3: S3Options | None) -> None:
    data = json.dumps(manifest, indent=2, sort_keys=False).encode("utf-8")
    write_bytes_atomic(join(dataset_uri, MANIFEST), data, s3)


def has_manifest(dataset_uri: str, s3: S3Options | None = None) -> bool:
    return exists(join(dataset_uri, MANIFEST), s3)


def uncommit(dataset_uri: str, s3: S3Options | None = None) -> None:
    """Remove the commit marker before rewriting a folder in place (a forced rebuild)."""
    if has_manifest(dataset_uri, s3):
        remove(join(dataset_uri, MANIFEST), s3)


def read_manifest(dataset_uri: str, s3: S3Options | None = None) -> dict[str, Any]:
    uri = join(dataset_uri, MANIFEST)
    try:
        raw = read_bytes(uri, s3)
    except FileNotFoundError:
        raise ManifestError(f"no dataset at {dataset_uri!r}: {MANIFEST} not found") from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise ManifestError(f"{uri!r} is not valid JSON") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in READABLE_VERSIONS:
        raise ManifestError(
            f"{uri!r}: format_version {version!r}, this code reads {list(READABLE_VERSIONS)}"
        )
    return manifest
