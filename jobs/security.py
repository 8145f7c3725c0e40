"""Keep secrets out of tracking, writes inside the storage root, and pickles out of loaders.

Everything logged to MLflow (params, tags, artifacts) passes through
``redact`` first: a credential in a config or a URI never reaches the server.
Every path that comes from a config or the model registry goes through
``ensure_within`` before anything is written there. Tensor files are read with
``safe_torch_load`` and DCP checkpoints through ``safe_dcp_reader``, which never run
pickled code (``torch.load`` without ``weights_only=True``, and DCP's own metadata
reader, execute arbitrary ``__reduce__`` payloads).
"""

from __future__ import annotations

import io
import os
import pickle
import posixpath
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jobs.errors import JobError

# Redaction lives in ``pipeline`` (the manifest needs it too); re-exported for every caller here.
from pipeline.redaction import (
    IN_VALUE,
    REDACTED,
    is_credential,
    is_secret_key,
    redact,
    redact_uri,
    split_secrets,
    strip_uri_credentials,
)

__all__ = [
    "IN_VALUE", "REDACTED", "PathEscapeError", "UnsafeLoadError", "ensure_within", "is_credential",
    "is_secret_key", "redact", "redact_uri", "safe_dcp_reader", "safe_join", "safe_torch_load",
    "split_secrets", "strip_uri_credentials",
]  # fmt: skip


class PathEscapeError(JobError):
    """A path from a config or the registry points outside the configured storage root."""


class UnsafeLoadError(JobError):
    """A model or checkpoint file would need unpickling arbitrary objects to load."""


def _is_remote(uri: str) -> bool:
    scheme = urlsplit(uri).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter is a Windows drive


def _local(path: str) -> str:
    return urlsplit(path).path if path.startswith("file://") else path


def ensure_within(root: str, path: str) -> str:
    """``path`` normalised, if it lies inside ``root``; else ``PathEscapeError``.

    Relative paths are taken relative to ``root``. Works for local folders
    (symlinks resolved, so a link cannot lead out) and for object stores
    (``s3://bucket/prefix``: same scheme, same bucket, under the prefix).
    """
    root, path = str(root), str(path)
    if not path or "\x00" in path:
        raise PathEscapeError(f"path {path!r} is empty or contains a NUL byte")
    if _is_remote(root):
        return _within_remote(root, path)
    if _is_remote(path):
        raise PathEscapeError(f"path {path!r} is outside the storage root {root!r}")
    base = Path(_local(root)).expanduser().resolve()
    target = (base / Path(_local(path)).expanduser()).resolve()
    if target != base and base not in target.parents:
        raise PathEscapeError(f"path {path!r} is outside the storage root {root!r}")
    return str(target)


def _within_remote(root: str, path: str) -> str:
    base = urlsplit(root)
    prefix = posixpath.normpath("/" + base.path.strip("/"))
    if _is_remote(path):
        target = urlsplit(path)
        same_place = (target.scheme, target.netloc) == (base.scheme, base.netloc)
        key = posixpath.normpath("/" + target.path.lstrip("/"))
    else:
        same_place = not path.startswith("/")
        key = posixpath.normpath(posixpath.join(prefix, path))
    inside = key == prefix or key.startswith(prefix.rstrip("/") + "/")
    if not (same_place and inside):
        raise PathEscapeError(f"path {path!r} is outside the storage root {root!r}")
    return f"{base.scheme}://{base.netloc}{key}".rstrip("/")


def safe_join(root: str, *parts: str) -> str:
    """``root`` joined with ``parts`` (names from configs, run names...), refused if it escapes."""
    return ensure_within(root, posixpath.join(*parts) if parts else ".")


def safe_torch_load(path: str | os.PathLike | io.IOBase, map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code."""
    import torch

    name = getattr(path, "name", path)
    source = path
    if isinstance(path, (str, os.PathLike)) and _is_remote(str(path)):
        import fsspec

        with fsspec.open(str(path), "rb") as f:
            source = io.BytesIO(f.read())
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeLoadError(
            f"refusing to load {name}: it holds objects other than tensors ({first})"
        ) from None


# What DCP pickles into a checkpoint's ``.metadata`` (torch.distributed.checkpoint.filesystem
# writes it with ``pickle.dump`` and reads it back with a plain ``pickle.load``).
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray"},
}  # fmt: skip


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_GLOBALS.get(module, ()) or (module == "torch" and _torch_value(name)):
            return super().find_class(module, name)
        raise UnsafeLoadError(f"refusing to unpickle {module}.{name} from checkpoint metadata")


def _torch_value(name: str) -> bool:
    """``torch.Size`` and the dtype, layout and memory-format constants (no callables)."""
    import torch

    value = getattr(torch, name, None)
    return name == "Size" or isinstance(value, (torch.dtype, torch.layout, torch.memory_format))


_BARE_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_storage_paths(metadata: Any, where: Any) -> None:
    """Every data file ``.metadata`` names must be a bare file name in its own folder: DCP
    joins ``relative_path`` onto the folder, so ``../x`` or ``/etc/x`` would be read too."""
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not _BARE_FILE_NAME.fullmatch(name):
            raise UnsafeLoadError(f"{where}: refusing data file {name!r} (not a bare file name)")


def safe_dcp_reader(path: str | os.PathLike):
    """A DCP ``FileSystemReader`` for ``dcp.load(sd, storage_reader=...)`` that never runs
    pickled code: the ``.metadata`` file is unpickled with an allowlist of DCP's own classes
    (tensor payloads are already read with ``torch.load(weights_only=True)`` by DCP)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            where = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(where, "rb") as f:
                metadata = _DcpMetadataUnpickler(f).load()
            if not isinstance(metadata, Metadata):
                raise UnsafeLoadError(f"{where}: not DCP metadata ({type(metadata).__name__})")
            _check_storage_paths(metadata, where)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)
