"""The Ray Train side of the worker: ``RayEnv`` and the function each worker runs."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch

from jobs.train.commit import write_commit
from jobs.train.env import checkpoint_dir_name

# Ray Train keeps (and logs) what is reported with each checkpoint: the headline
# numbers only; the full set goes to MLflow and the worker's return value.
_REPORTED = ("train/loss", "val/loss", "train/tokens_seen")


class RayEnv:
    keeps_checkpoints = True

    def __init__(self, run_uri: str, progress_sink=None) -> None:
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_uri = run_uri
        self.sink = progress_sink

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        """The newest committed checkpoint of the run (not Ray's latest report: Ray registers
        a checkpoint once every rank reported, before rank 0 has written the marker)."""
        from jobs.train.checkpoint import local_copy, remove_dir
        from jobs.train.runs import latest_checkpoint

        saved = latest_checkpoint(self.run_uri)
        if saved is None:
            yield None
            return
        path, temporary = local_copy(saved.uri)
        try:
            yield str(path)
        finally:
            if temporary:
                remove_dir(path)

    def save(self, local_dir: Path, step: int, metrics: dict[str, float]) -> str:
        """Every rank reports its part; Ray merges them into one folder in storage. Once all
        ranks are past ``report`` (each has uploaded its files), rank 0 commits the folder."""
        name = checkpoint_dir_name(step)
        kept = {k: float(v) for k, v in metrics.items() if k in _REPORTED}
        ray.train.report(
            kept | {"step": step},
            checkpoint=ray.train.Checkpoint.from_directory(str(local_dir)),
            checkpoint_dir_name=name,
        )
        uri = f"{self.run_uri.rstrip('/')}/{name}"
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            write_commit(uri, step)
        return uri

    def progress(self, update: dict[str, float]) -> None:
        if self.rank == 0 and self.sink is not None:
            self.sink.push.remote(update)

    def should_kill(self, step: int) -> bool:
        """The kill hook fires once per run and step: a marker on this node remembers it."""
        key = hashlib.sha256(f"{self.run_uri}:{step}".encode()).hexdigest()[:16]
        marker = Path(tempfile.gettempdir()) / f"moe-pretrain-killed-{key}"
        if marker.exists():
            return False
        marker.touch()
        return True


def train_fn(config: dict[str, Any]) -> dict[str, Any]:
    from jobs.config import RootConfig
    from jobs.tracking.mlflow_tracker import MlflowSpec
    from jobs.train import loop

    root = RootConfig.model_validate(config["root"])
    env = RayEnv(config["run_uri"], config.get("progress_sink"))
    tracking = MlflowSpec(**config["tracking"]) if config.get("tracking") else None
    return loop.run(root, config["dataset_uri"], env, tracking, init_from=config.get("init_from"))
