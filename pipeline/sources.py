"""Expand input URIs into a sorted listing of files: what the fingerprint hashes.

Accepted: local files, folders (recursive, hidden entries skipped) and globs;
``s3://`` objects, prefixes and globs; ``hf://datasets/ORG/NAME[/path]`` (the
Hugging Face hub through ``huggingface_hub``'s fsspec filesystem, imported only
when used); ``builtin://python-docs``. A URI that names nothing fails fast.
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import S3Options
from pipeline.errors import InputNotFoundError, PipelineError
from pipeline.formats import COMPRESSIONS, FORMATS
from pipeline.redaction import redact_uri
from pipeline.storage import filesystem

_GLOB_CHARS = set("*?[")
_DATA_FORMATS = ("jsonl", "json", "parquet")


@dataclass(frozen=True)
class SourceFile:
    uri: str
    size: int
    version: str
    format: str
    compression: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceFile:
        return cls(**d)

    def listing_entry(self) -> dict[str, Any]:
        """What the manifest and the fingerprint keep: credentials in the URI redacted, so a
        rotated password neither leaks nor rebuilds the dataset."""
        return {"path": redact_uri(self.uri), "size": self.size, "mtime_or_etag": self.version}


def detect_format(name: str) -> tuple[str, str | None]:
    """``("jsonl", "gzip")`` for ``x.jsonl.gz``; ``"unsupported"`` when the suffix is unknown."""
    base, ext = os.path.splitext(name.lower())
    compression = COMPRESSIONS.get(ext)
    if compression:
        base, ext = os.path.splitext(base)
    return FORMATS.get(ext, "unsupported"), compression


def list_sources(inputs: list[str], s3: S3Options | None = None) -> list[SourceFile]:
    found: dict[str, SourceFile] = {}
    for uri in inputs:
        for src in _expand(uri.strip(), s3):
            found.setdefault(src.uri, src)
    return [found[k] for k in sorted(found)]


def _expand(uri: str, s3: S3Options | None) -> list[SourceFile]:
    if uri.startswith("builtin://"):
        from pipeline.builtin_corpus import list_builtin

        return list_builtin(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        return _expand_local(uri)
    if uri.startswith("hf://"):
        _require_hf()
    return _expand_remote(uri, s3)


def _local_file(path: str) -> SourceFile:
    fmt, comp = detect_format(path)
    try:
        st = os.stat(path)
        size, version = st.st_size, str(st.st_mtime_ns)
    except OSError:
        size, version = -1, "unreadable"
    return SourceFile(os.path.abspath(path), size, version, fmt, comp)


def _expand_local(path: str) -> list[SourceFile]:
    if any(c in path for c in _GLOB_CHARS):
        matches = [p for p in glob.glob(path, recursive=True) if not os.path.isdir(p)]
        if not matches:
            raise InputNotFoundError(f"input {path!r}: the glob matches no file")
        return [_local_file(p) for p in matches]
    if os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
        if not files:
            raise InputNotFoundError(f"input {path!r}: the folder holds no file")
        return [_local_file(p) for p in files]
    if os.path.lexists(path):
        return [_local_file(path)]
    raise InputNotFoundError(f"input {path!r}: no such file or folder")


def _remote_file(protocol: str, path: str, info: dict[str, Any]) -> SourceFile:
    fmt, comp = detect_format(path)
    version = (
        info.get("ETag")
        or info.get("etag")
        or (info.get("lfs") or {}).get("sha256")
        or info.get("blob_id")
        or str(info.get("LastModified") or info.get("mtime") or "")
    )
    return SourceFile(f"{protocol}://{path}", int(info.get("size") or 0), str(version).strip('"'),
                      fmt, comp)  # fmt: skip


def _expand_remote(uri: str, s3: S3Options | None) -> list[SourceFile]:
    protocol = uri.split("://", 1)[0]
    fs, path = filesystem(uri, s3)
    fs.invalidate_cache()
    folder = False
    try:
        if any(c in path for c in _GLOB_CHARS):
            infos = fs.glob(path, detail=True)
        elif fs.isdir(path):
            infos, folder = fs.find(path, detail=True), True
        elif fs.exists(path):
            infos = {path: fs.info(path)}
        else:
            infos = {}
    except (FileNotFoundError, PermissionError) as e:
        raise InputNotFoundError(f"input {uri!r}: {type(e).__name__}") from None
    files = [
        _remote_file(protocol, p, info)
        for p, info in infos.items()
        if info.get("type") != "directory" and not os.path.basename(p).startswith(".")
    ]
    if protocol == "hf" and folder:
        # A hub dataset repo also holds its card (README.md) and scripts: keep the data files.
        files = [f for f in files if f.format in _DATA_FORMATS]
    if not files:
        raise InputNotFoundError(f"input {uri!r}: no such object, prefix or glob match")
    return files


def _require_hf() -> None:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise PipelineError(
            "hf:// inputs need the huggingface_hub package: pip install huggingface_hub"
        ) from None
