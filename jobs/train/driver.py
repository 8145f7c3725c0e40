"""The Ray Train driver: validate, build a ``TorchTrainer``, show progress, return the result.

Runs are named: ``{storage.root}/runs/{run_name}`` holds Ray Train's state and
the checkpoints, and the MLflow run carries the same name. Calling ``train``
again with the same name resumes from the newest checkpoint (Ray Train reads
its own snapshot there); before any worker starts, the driver refuses a resume
onto a different dataset or model, naming which one changed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.config import RootConfig
from jobs.errors import JobError
from jobs.paths import safe_join
from jobs.settings import ConfigError
from jobs.tracking.base import resolve_tracking_uri
from jobs.train.checkpoint import check_resume
from jobs.train.init_from import confine_init_from
from jobs.train.runs import checkpoint_names, latest_checkpoint, ray_storage, runs_uri
from pipeline.errors import PipelineError
from pipeline.locks import storage_lock
from pipeline.redaction import is_secret_key

log = logging.getLogger("jobs.train")


@dataclass
class TrainResult:
    checkpoint_uri: str
    mlflow_run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    run_name: str = ""


def absolute_tracking_uri(uri: str) -> str:
    """Workers run in other directories: pin a relative SQLite or file store to this one."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def default_run_name(dataset_name: str) -> str:
    return f"train-{dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(
    cfg: RootConfig,
    dataset_uri: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    init_from: str | None = None,
    progress: bool = True,
) -> TrainResult:
    from pipeline.reader import DatasetReader

    reader = DatasetReader(dataset_uri)
    model_cfg = cfg.model.build(reader.vocab_size)
    from jobs.train.loop import _check_fits

    _check_fits(reader, model_cfg)
    cfg.train.grad_accum(reader.seq_len, cfg.train.num_workers)
    cfg.train.check_expert_parallel(model_cfg.num_experts, cfg.train.num_workers)
    run_name = run_name or default_run_name(reader.manifest.get("name", "dataset"))
    runs = runs_uri(cfg.storage.root)
    run_uri = safe_join(runs, run_name)
    if init_from is None and cfg.train.init_from not in (None, "champion"):
        init_from = cfg.train.init_from  # `champion` is resolved by `run` (jobs.service.steps.data)
    if init_from is not None:
        init_from = confine_init_from(cfg.storage.root, init_from)
    # Two trainings of one run would share its folder and MLflow run: one at a time.
    with storage_lock(f"{run_uri}.lock"):
        return _train_locked(cfg, reader, model_cfg, run_name, run_uri, parent_run_id, init_from,
                             progress)  # fmt: skip


def _train_locked(
    cfg: RootConfig, reader, model_cfg, run_name: str, run_uri: str, parent_run_id: str | None,
    init_from: str | None, progress: bool,
) -> TrainResult:  # fmt: skip
    dataset_uri = reader.uri
    runs = runs_uri(cfg.storage.root)
    saved = latest_checkpoint(run_uri)
    if saved is not None:
        check_resume(
            saved.state, reader.fingerprint, model_cfg, saved.uri, saved.model_config,
            seed=cfg.train.seed,
        )  # fmt: skip
        log.info("run %s resumes from %s (step %d)", run_name, saved.uri, saved.state.step)
    tracking = {
        "uri": absolute_tracking_uri(resolve_tracking_uri(cfg.tracking.uri)),
        "experiment": cfg.tracking.experiment,
        "run_name": run_name,
        "run_key": run_uri,
        "parent_run_id": parent_run_id,
        "spool_uri": safe_join(run_uri, "mlflow-spool"),  # what MLflow has not taken yet
    }
    loop_config = {
        "root": cfg.model_dump(mode="json"),
        "dataset_uri": dataset_uri,
        "run_uri": run_uri,
        "tracking": tracking,
        "init_from": init_from,
    }
    out = _fit(cfg, run_name, runs, loop_config, progress)
    if out.get("aborted"):
        raise JobError(out["aborted"])
    checkpoint = out.get("checkpoint") or (saved.uri if saved is not None else None)
    if checkpoint is None:
        raise JobError(f"run {run_name} ended without a checkpoint")
    return TrainResult(
        checkpoint_uri=checkpoint,
        mlflow_run_id=out.get("mlflow_run_id"),
        metrics=out.get("metrics", {}),
        steps=out.get("steps", 0),
        run_name=run_name,
    )


def _fit(
    cfg: RootConfig, run_name: str, runs: str, loop_config: dict[str, Any], progress: bool
) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.train.progress import ProgressBar, progress_sink_actor
    from jobs.train.ray_worker import train_fn

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"))
    # Ray Train gives a worker group 60 s to start; a busy node importing torch in
    # several fresh processes, or a cluster pulling images, can need more.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    t = cfg.train
    use_gpu = t.use_gpu if t.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    sink = progress_sink_actor()
    loop_config = {**loop_config, "progress_sink": sink}
    storage_path, storage_fs = ray_storage(runs)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_last_k),
            worker_runtime_env={"env_vars": _forwarded_env()},
        ),
    )
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=_run_fit, args=(trainer, outcome), daemon=True)
    with ProgressBar(t.max_steps, run_name, enabled=progress) as bar:
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            bar.update(_poll(sink))
        bar.update(_poll(sink))
    ray.kill(sink)
    if "error" in outcome:
        raise _user_error(outcome["error"])
    _drop_orphans(outcome["result"], loop_config["run_uri"])
    return outcome["result"].return_value or {}


def _drop_orphans(result, run_uri: str) -> None:
    """Delete checkpoint folders that Ray's retention does not know of. A checkpoint committed
    just before a worker died may never reach Ray's checkpoint manager, so ``num_to_keep``
    would leave it behind for good. Only what Ray's run snapshot references is kept, so a
    later rerun of the run still finds every checkpoint the snapshot names."""
    from pipeline.storage import filesystem

    known = {c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in result.best_checkpoints or []}
    if not known:
        return
    fs, path = filesystem(run_uri)
    for name in checkpoint_names(run_uri):
        if name not in known:
            fs.rm(f"{path.rstrip('/')}/{name}", recursive=True)


def _run_fit(trainer, outcome: dict[str, Any]) -> None:
    try:
        outcome["result"] = trainer.fit()
    except Exception as e:
        outcome["error"] = e


def _poll(sink) -> dict[str, Any] | None:
    import ray

    try:
        return ray.get(sink.get.remote(), timeout=5)
    except Exception:
        return None


def _forwarded_env() -> dict[str, str]:
    """MLflow settings of the driver for rank 0, credentials left out: Ray logs a runtime_env
    in plain text, so passwords and tokens reach the workers through the nodes' environment."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_") and not is_secret_key(k)}


def _user_error(err: Exception) -> Exception:
    """A worker's failure as one line: the user's own error type where it was one."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        cause = _root_cause(failure)
        if isinstance(cause, (JobError, PipelineError, ConfigError)):
            return cause
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return JobError(f"training failed on worker {rank}: {type(cause).__name__}: {first}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return JobError(f"training failed: {first}")


def _root_cause(err: BaseException) -> BaseException:
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if inner is None:
            return err
        err = inner
    return err
