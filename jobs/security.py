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
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from jobs.errors import JobError

REDACTED = "***"
# Words that name a credential wherever they appear in a key (``aws_secret_access_key``,
# ``apiKey``, ``RAY_AUTH_TOKEN``); whole words only, so ``tokenizer`` and ``monkey`` pass.
_SECRET_WORDS = frozenset(
    {"secret", "password", "passwd", "passphrase", "token", "key", "apikey", "credential",
     "credentials", "auth", "authorization", "cookie", "signature"}
)  # fmt: skip
# A following word that describes or locates the credential instead of holding it
# (``RAY_AUTH_MODE``, ``MLFLOW_AUTH_CONFIG_PATH``); URIs are still checked by ``redact_uri``.
_DESCRIPTOR_NEXT = frozenset(
    {"mode", "type", "types", "method", "enabled", "count", "len", "length",
     "config", "path", "file", "dir", "url", "uri", "endpoint"}
)  # fmt: skip
# In a language-model code base "token" is also the unit of text: ``eos_token_id`` is not a secret.
_TEXT_TOKEN_NEXT = frozenset({"id", "ids"})
# "auth" and "authorization" hold a credential only as the last word (``basic_auth``); before
# other words they are a namespace and those words decide (``RAY_AUTH_TOKEN``: yes,
# ``MLFLOW_AUTH_ADMIN_USERNAME``: no).
_NAMESPACE_WORDS = frozenset({"auth", "authorization"})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


class PathEscapeError(JobError):
    """A path from a config or the registry points outside the configured storage root."""


class UnsafeLoadError(JobError):
    """A model or checkpoint file would need unpickling arbitrary objects to load."""


def is_secret_key(key: str) -> bool:
    words = [w.lower() for w in _WORD.findall(key)]
    for i, word in enumerate(words):
        if word not in _SECRET_WORDS:
            continue
        following = words[i + 1] if i + 1 < len(words) else ""
        if following in _DESCRIPTOR_NEXT or (word == "token" and following in _TEXT_TOKEN_NEXT):
            continue
        if following and word in _NAMESPACE_WORDS:
            continue
        return True
    return False


def _redact_query(uri: str) -> str:
    parts = urlsplit(uri)
    if not parts.query:
        return uri
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(is_secret_key(k) for k, _ in pairs):
        return uri
    query = urlencode([(k, REDACTED if is_secret_key(k) else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(query=query))


def redact_uri(value: str) -> str:
    """``https://user:pw@host/x?token=t`` -> ``https://***@host/x?token=***``, also inside text."""
    value = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", value)
    return _URI.sub(lambda m: _redact_query(m.group(0)), value)


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` with secret-named keys and URI credentials replaced by ``***``."""
    if key and is_secret_key(key.rsplit(".", 1)[-1]) and value not in (None, ""):
        return REDACTED
    if hasattr(value, "get_secret_value"):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_uri(value)
    return value


def strip_query_secrets(uri: str) -> str:
    """Drop a URI's query string (presigned URLs carry signatures there)."""
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


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
