"""Checkpoint format: model + optimizer through torch.distributed.checkpoint, state as JSON.

A checkpoint directory::

    checkpoint_00000200/
        dcp/.metadata, dcp/__0_0.distcp, ...   {"model": ..., "optim": ...} (DCP)
        model_config.json                      ModelConfig.to_dict()
        trainer_state.json                     TrainerState (step, sampler position, ...)

DCP writes one file per rank and reshards on load, so a run saved under FSDP
on 8 GPUs resumes on 4, and ``load_checkpoint_model`` reads it in one process.
Nothing is pickled: DCP stores tensors and a metadata file, the rest is JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from jobs.errors import JobError
from jobs.security import safe_dcp_reader
from moe_model import ModelConfig, MoETransformer

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
MODEL_CONFIG_FILE = "model_config.json"
DCP_DIR = "dcp"


@dataclass
class TrainerState:
    """Everything beyond tensors that a resumed run needs to continue exactly."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    dataset_uri: str = ""
    dataset_fingerprint: str = ""
    model_config_hash: str = ""
    seed: int = 0
    world_size: int = 1
    global_batch_size: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    # Steps since each expert (layer-major, L*E) last received a token.
    expert_idle_steps: list[int] = field(default_factory=list)
    # Data order and per-step RNG are functions of (seed, step), so this names the scheme.
    rng: dict[str, Any] = field(default_factory=lambda: {"scheme": "manual_seed(seed, step, rank)"})
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns when used without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dcp_load(state_dict: dict[str, Any], path: Path) -> None:
    """``dcp.load`` through the allowlisting reader: a planted ``.metadata`` never runs code."""
    from torch.distributed.checkpoint.api import CheckpointException

    with _single_process_ok():
        try:
            dcp.load(state_dict, storage_reader=safe_dcp_reader(path / DCP_DIR))
        except CheckpointException as e:  # a BaseException: `except Exception` misses it
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise JobError(f"checkpoint {path} could not be loaded: {first}") from None


def config_hash(cfg: ModelConfig) -> str:
    text = json.dumps(cfg.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    model_cfg: ModelConfig,
    rank: int,
) -> None:
    """Collective under a process group: every rank calls it with its own local ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / DCP_DIR))
    if rank == 0:
        (path / MODEL_CONFIG_FILE).write_text(json.dumps(model_cfg.to_dict(), indent=2))
        (path / STATE_FILE).write_text(state.to_json())


def load_training_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainerState:
    """Restore model and optimizer in place (collective); returns the trainer state."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    both = {"model": model_sd, "optim": optim_sd}
    _dcp_load(both, path)
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
    return read_state(path)


def load_model_weights(uri: str, model: nn.Module, model_cfg: ModelConfig) -> None:
    """Start from another run's weights (not its optimizer or data position): ``init_from``."""
    path, temporary = local_copy(uri)
    try:
        saved = json.loads((path / MODEL_CONFIG_FILE).read_text())
        if saved != model_cfg.to_dict():
            change = describe_model_change(saved, model_cfg)
            raise JobError(f"init_from {uri}: model config differs ({change})")
        model_sd = get_model_state_dict(model)
        sd = {"model": model_sd}
        _dcp_load(sd, path)
        set_model_state_dict(model, sd["model"])
    finally:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)


def read_state(path: str | Path) -> TrainerState:
    return TrainerState.from_dict(json.loads((Path(path) / STATE_FILE).read_text()))


def check_resume(
    state: TrainerState,
    fingerprint: str,
    model_cfg: ModelConfig,
    where: str,
    saved_model: dict[str, Any] | None = None,
) -> None:
    """Refuse to continue a run on other data or another model: say which changed."""
    if state.dataset_fingerprint != fingerprint:
        raise JobError(
            f"cannot resume from {where}: dataset fingerprint changed "
            f"(checkpoint {state.dataset_fingerprint}, now {fingerprint}); "
            "use a new --run-name to start over"
        )
    if state.model_config_hash != config_hash(model_cfg):
        change = (
            describe_model_change(saved_model, model_cfg)
            if saved_model
            else f"hash {state.model_config_hash} -> {config_hash(model_cfg)}"
        )
        raise JobError(
            f"cannot resume from {where}: model config changed ({change}); "
            "use a new --run-name to start over"
        )


def describe_model_change(saved: dict[str, Any], current: ModelConfig) -> str:
    """``"num_layers: 2 -> 3, top_k: 2 -> 1"`` for the error message of a refused resume."""
    now = current.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
    return ", ".join(diffs) or "no field differs"


def local_copy(uri: str) -> tuple[Path, bool]:
    """(local directory, is_temporary) for a checkpoint at a local path or remote URI."""
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://")), False
    from pipeline.storage import filesystem

    fs, remote = filesystem(uri)
    if not fs.exists(f"{remote.rstrip('/')}/{STATE_FILE}"):
        raise JobError(f"no checkpoint at {uri} (missing {STATE_FILE})")
    tmp = Path(tempfile.mkdtemp(prefix="moe-ckpt-"))
    fs.get(remote.rstrip("/") + "/", str(tmp), recursive=True)
    return tmp, True


def load_checkpoint_model(uri: str) -> tuple[MoETransformer, ModelConfig, dict[str, Any]]:
    """The model of a training checkpoint (local or s3://), in one process, on CPU, fp32."""
    path, temporary = local_copy(uri)
    try:
        if not (path / STATE_FILE).is_file():
            raise JobError(f"no checkpoint at {uri} (missing {STATE_FILE})")
        cfg = ModelConfig.from_dict(json.loads((path / MODEL_CONFIG_FILE).read_text()))
        model = MoETransformer(cfg)
        sd = {"model": model.state_dict()}
        _dcp_load(sd, path)
        model.load_state_dict(sd["model"])
        state = json.loads((path / STATE_FILE).read_text())
        return model.eval(), cfg, state
    finally:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)


def remove_dir(path: str | Path) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
