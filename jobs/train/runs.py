"""Where runs live: ``{storage.root}/runs/{run_name}/checkpoint_XXXXXXXX``, local or S3."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from jobs.train.checkpoint import MODEL_CONFIG_FILE, STATE_FILE, TrainerState
from jobs.train.commit import is_committed
from pipeline.storage import is_remote

CHECKPOINT_NAME = re.compile(r"checkpoint_\d{8}")


def runs_uri(storage_root: str) -> str:
    if is_remote(storage_root):
        return storage_root.rstrip("/") + "/runs"
    return os.path.join(os.path.abspath(storage_root.removeprefix("file://")), "runs")


@dataclass
class SavedCheckpoint:
    uri: str
    state: TrainerState
    model_config: dict[str, Any]


def checkpoint_names(run_uri: str) -> list[str]:
    """The run folder's ``checkpoint_XXXXXXXX`` folder names, oldest first (none if no folder)."""
    from pipeline.storage import filesystem

    fs, path = filesystem(run_uri)
    if not fs.exists(path):
        return []
    listed = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return sorted(name for name in listed if CHECKPOINT_NAME.fullmatch(name))


def latest_checkpoint(run_uri: str) -> SavedCheckpoint | None:
    """The newest committed checkpoint of a run (highest step with a valid commit marker)."""
    from pipeline.storage import filesystem

    fs, path = filesystem(run_uri)
    for name in reversed(checkpoint_names(run_uri)):
        base = f"{path.rstrip('/')}/{name}"
        if is_committed(f"{run_uri.rstrip('/')}/{name}"):
            state = TrainerState.from_dict(json.loads(fs.cat_file(f"{base}/{STATE_FILE}")))
            model = json.loads(fs.cat_file(f"{base}/{MODEL_CONFIG_FILE}"))
            return SavedCheckpoint(f"{run_uri.rstrip('/')}/{name}", state, model)
    return None


def ray_storage(runs: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``.

    Remote storage goes through fsspec (wrapped for pyarrow) so that S3
    endpoint and credentials come from the same place as the dataset's.
    """
    if not is_remote(runs):
        return runs, None
    import pyarrow.fs

    from pipeline.storage import filesystem

    fs, path = filesystem(runs)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
