"""One way to reach local disk, S3 and the Hugging Face hub: fsspec URIs.

S3 credentials and endpoint come from the standard AWS variables
(``AWS_ENDPOINT_URL`` included, which not every botocore release reads on its
own) unless ``data.s3`` overrides them. Nothing here logs an option value.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec

from pipeline.config import S3Options
from pipeline.errors import StorageError, UnsafePathError


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_storage_options(s3: S3Options | None) -> dict[str, Any]:
    s3 = s3 or S3Options()
    endpoint = (
        s3.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    client: dict[str, Any] = {}
    if endpoint:
        client["endpoint_url"] = endpoint
    if s3.region:
        client["region_name"] = s3.region
    opts: dict[str, Any] = {"client_kwargs": client, "anon": s3.anon}
    if s3.key is not None:
        opts["key"] = s3.key.get_secret_value()
    if s3.secret is not None:
        opts["secret"] = s3.secret.get_secret_value()
    return opts


def filesystem(uri: str, s3: S3Options | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for a URI; ``path`` is what ``fs`` methods take."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    opts = s3_storage_options(s3) if protocol in ("s3", "s3a") else {}
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def resolve(dataset_uri: str, rel: str) -> str:
    """A manifest path as a URI, confined to the dataset's own ``datasets/{name}/`` folder.

    Paths are relative to the dataset folder; ``..`` may reach an earlier build of the
    same name (how an incremental dataset names its base's shards), nothing further.
    An absolute path, another scheme or bucket, or a symlink that leads out is refused.
    """
    bad = (
        not isinstance(rel, str) or not rel or "://" in rel or rel.startswith(("/", "~"))
        or "\\" in rel or "\x00" in rel
    )  # fmt: skip
    if bad:
        raise UnsafePathError(f"manifest path {rel!r} of {dataset_uri}: must be relative")
    scheme, sep, path = dataset_uri.rstrip("/").rpartition("://")
    here = posixpath.normpath(path)
    folder = posixpath.dirname(here) or here
    target = posixpath.normpath(posixpath.join(here, rel))
    inside = target.startswith(folder.rstrip("/") + "/")
    if inside and not sep:  # local: a symlink must not lead out either
        real = os.path.realpath(folder)
        inside = os.path.realpath(target).startswith(real.rstrip("/") + "/")
    if not inside:
        raise UnsafePathError(
            f"manifest path {rel!r} of {dataset_uri}: outside the dataset's folder {folder}"
        )
    return f"{scheme}{sep}{target}"


def commit_file(local_path: str, uri: str, s3: S3Options | None = None) -> None:
    """Publish a finished local file at ``uri`` so that readers never see half of it.

    Local: copy beside the target under a temporary name, then ``os.replace``
    (atomic on POSIX). Object stores: a PUT is atomic per object, so upload,
    then check the stored size before anyone is told the object exists.
    """
    fs, path = filesystem(uri, s3)
    size = os.path.getsize(local_path)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _copy_local(local_path, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs.put_file(local_path, path)
    fs.invalidate_cache(path)
    stored = fs.info(path)["size"]
    if stored != size:
        raise StorageError(f"upload of {uri} stored {stored} bytes, expected {size}")


def _copy_local(src: str, dst: str) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(1 << 22):
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())


def write_local_atomic(path: str, data: bytes) -> None:
    """``data`` at the local ``path``: written beside it under a temporary name, synced, then
    ``os.replace``d (atomic on POSIX), so a reader sees the old file or the whole new one."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    fs, path = filesystem(uri, s3)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_local_atomic(path, data)
        return
    fs.pipe_file(path, data)
    fs.invalidate_cache(path)
    if fs.info(path)["size"] != len(data):
        raise StorageError(f"upload of {uri} did not store {len(data)} bytes")


def read_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    fs, path = filesystem(uri, s3)
    return fs.cat_file(path)


def exists(uri: str, s3: S3Options | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    if is_remote(uri):
        fs.invalidate_cache(path)
    return fs.exists(path)


def list_files(uri: str, s3: S3Options | None = None) -> dict[str, int]:
    """Every file under ``uri`` as ``{relative path: size}`` (empty when there is none)."""
    fs, path = filesystem(uri, s3)
    if is_remote(uri):
        fs.invalidate_cache()
    if not fs.exists(path):
        return {}
    base = path.rstrip("/") + "/"
    found = fs.find(path, detail=True)
    return {p[len(base) :]: int(info.get("size") or 0) for p, info in found.items()}


def remove(uri: str, s3: S3Options | None = None) -> None:
    fs, path = filesystem(uri, s3)
    fs.rm_file(path)
