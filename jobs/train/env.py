"""Where the worker loop runs: its rank, device, and how checkpoints are kept.

``LocalEnv`` runs the loop in the current process without Ray (benchmarks,
tests, a quick run on a laptop). ``jobs.train.ray_worker.RayEnv`` is the same
interface on a Ray Train worker.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from jobs.train.commit import is_committed, write_commit


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


class WorkerEnv(Protocol):
    rank: int
    world_size: int
    device: torch.device
    keeps_checkpoints: bool

    def restore_dir(self) -> contextlib.AbstractContextManager[str | None]: ...

    def save(self, local_dir: Path, step: int, metrics: dict[str, float]) -> str: ...

    def progress(self, update: dict[str, float]) -> None: ...

    def should_kill(self, step: int) -> bool: ...


class LocalEnv:
    """One process, checkpoints in ``out_dir/checkpoint_XXXXXXXX``, the last ``keep`` kept.

    ``out_dir=None`` keeps no checkpoints (benchmarks).
    """

    def __init__(
        self,
        out_dir: str | Path | None,
        keep: int = 3,
        device: torch.device | None = None,
        on_progress: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.keeps_checkpoints = out_dir is not None
        self.keep = keep
        self.rank, self.world_size = 0, 1
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.on_progress = on_progress

    def checkpoints(self) -> list[Path]:
        if self.out_dir is None:
            return []
        found = self.out_dir.glob("checkpoint_*")
        return sorted(p for p in found if is_committed(str(p)))

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        found = self.checkpoints()
        yield str(found[-1]) if found else None

    def save(self, local_dir: Path, step: int, metrics: dict[str, float]) -> str:
        target = self.out_dir / checkpoint_dir_name(step)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(local_dir), target)
        write_commit(str(target), step)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return str(target)

    def progress(self, update: dict[str, float]) -> None:
        if self.on_progress is not None:
            self.on_progress(update)

    def should_kill(self, step: int) -> bool:
        return False
