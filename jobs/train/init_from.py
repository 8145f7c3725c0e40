"""Where a run's starting weights may come from: a checkpoint inside the storage root.

``train.init_from`` (a path or URI, or ``champion``: the checkpoint a registry tag
names, and any EDIT user of the registry can change a tag), a step record's
checkpoint and a checkpoint's own ``dataset_uri`` are read with the pipeline's
credentials, so each is confined to ``storage.root`` before anything reads it.
Every kind of ``init_from`` goes through ``confine_checkpoint``, ``upcycle:PATH``'s dense
folder included.
"""

from __future__ import annotations

import os
from typing import Literal

from jobs.paths import PathEscapeError, ensure_within
from jobs.train.upcycling import PREFIX, upcycle_source


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def confine_checkpoint(
    storage_root: str,
    uri: str,
    key: str = "train.init_from",
    relative_to: Literal["cwd", "root"] = "cwd",
) -> str:
    """``uri`` normalised, if it lies inside ``storage_root``; else ``PathEscapeError``
    naming ``key``. A relative local path is taken from the working directory (``"cwd"``:
    as the user typed it) or under ``storage_root`` (``"root"``: an ``upcycle:`` folder, as
    the README documents), then checked."""
    if relative_to == "cwd" and _is_local(uri) and uri:
        uri = os.path.abspath(uri.removeprefix("file://"))
    try:
        return ensure_within(storage_root, uri)
    except PathEscapeError as e:
        raise PathEscapeError(f"{key}: {e}") from None


def confine_init_from(storage_root: str, init_from: str) -> str:
    """``train.init_from`` confined: a checkpoint read from the working directory, an
    ``upcycle:PATH`` folder under ``storage_root`` (and still ``upcycle:``-prefixed)."""
    dense = upcycle_source(init_from)
    if dense is None:
        return confine_checkpoint(storage_root, init_from)
    return PREFIX + confine_checkpoint(storage_root, dense, relative_to="root")
