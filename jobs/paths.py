"""Writes stay inside the storage root.

Every path that comes from a config or the model registry goes through
``ensure_within`` before anything is written there.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from urllib.parse import urlsplit

from jobs.errors import JobError


class PathEscapeError(JobError):
    """A path from a config or the registry points outside the configured storage root."""


def has_remote_scheme(uri: str) -> bool:
    """``s3://b/k`` and the like: a scheme other than ``file`` (by the scheme, not ``://``)."""
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
    if has_remote_scheme(root):
        return _within_remote(root, path)
    if has_remote_scheme(path):
        raise PathEscapeError(f"path {path!r} is outside the storage root {root!r}")
    base = Path(_local(root)).expanduser().resolve()
    target = (base / Path(_local(path)).expanduser()).resolve()
    if target != base and base not in target.parents:
        raise PathEscapeError(f"path {path!r} is outside the storage root {root!r}")
    return str(target)


def _within_remote(root: str, path: str) -> str:
    base = urlsplit(root)
    prefix = posixpath.normpath("/" + base.path.strip("/"))
    if has_remote_scheme(path):
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
