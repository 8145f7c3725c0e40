"""Pickles stay out of loaders.

Tensor files are read with ``safe_torch_load`` and DCP checkpoints through
``safe_dcp_reader``, which never run pickled code (``torch.load`` without
``weights_only=True``, and DCP's own metadata reader, execute arbitrary
``__reduce__`` payloads).
"""

from __future__ import annotations

import io
import os
import pickle
import re
from typing import Any

from jobs.errors import JobError
from jobs.paths import has_remote_scheme


class UnsafeLoadError(JobError):
    """A model or checkpoint file would need unpickling arbitrary objects to load."""


def safe_torch_load(path: str | os.PathLike | io.IOBase, map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code."""
    import torch

    name = getattr(path, "name", path)
    source = path
    if isinstance(path, (str, os.PathLike)) and has_remote_scheme(str(path)):
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
