"""The commit marker of a checkpoint: written last, after every rank's files are in place.

Each rank writes its own DCP shard, and rank 0 alone writes the JSON files, so a
folder holding ``trainer_state.json`` may still miss another rank's shard. Rank 0
writes ``commit.json`` only after every rank has reported (``RayEnv.save``) or the
folder has been moved into place (``LocalEnv.save``); it lists every file of the
folder with its size. A checkpoint is complete when the marker exists and every
file it lists is there with that size: nothing resumes from, reports or loads a
checkpoint that is not (local folders and ``s3://`` alike).
"""

from __future__ import annotations

import json
from typing import Any

from jobs.errors import JobError

COMMIT_FILE = "commit.json"


def _fs(uri: str):
    from pipeline.storage import filesystem

    return filesystem(uri.removeprefix("file://") if uri.startswith("file://") else uri)


def _listing(fs, path: str) -> dict[str, int]:
    base = path.rstrip("/") + "/"
    found = fs.find(path, detail=True)
    return {
        name[len(base) :]: int(info.get("size") or 0)
        for name, info in found.items()
        if info.get("type") != "directory" and name.startswith(base)
    }


def write_commit(uri: str, step: int) -> None:
    """List the finished folder and write the marker (atomically on local disk)."""
    fs, path = _fs(uri)
    fs.invalidate_cache(path)
    files = {k: v for k, v in _listing(fs, path).items() if k != COMMIT_FILE}
    data = json.dumps({"step": step, "files": files}, indent=1, sort_keys=True).encode()
    target = f"{path.rstrip('/')}/{COMMIT_FILE}"
    if "://" in uri and not uri.startswith("file://"):
        fs.pipe_file(target, data)
        fs.invalidate_cache(path)
        return
    from pipeline.storage import write_local_atomic

    write_local_atomic(target, data)


def commit_problem(uri: str) -> str | None:
    """Why ``uri`` is not a complete checkpoint, or None when it is."""
    fs, path = _fs(uri)
    fs.invalidate_cache(path)
    marker = f"{path.rstrip('/')}/{COMMIT_FILE}"
    if not fs.exists(marker):
        return f"no {COMMIT_FILE}: the save did not finish"
    try:
        listed: dict[str, Any] = json.loads(fs.cat_file(marker))["files"]
    except (ValueError, KeyError, TypeError):
        return f"{COMMIT_FILE} is not readable"
    present = _listing(fs, path)
    for name, size in sorted(listed.items()):
        if present.get(name) != size:
            return f"{name} is missing or has another size than {COMMIT_FILE} recorded"
    return None


def is_committed(uri: str) -> bool:
    return commit_problem(uri) is None


def require_committed(uri: str) -> None:
    problem = commit_problem(uri)
    if problem is not None:
        raise JobError(f"checkpoint {uri} is not complete ({problem})")
