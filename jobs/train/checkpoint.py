"""Checkpoint format: model + optimizer through torch.distributed.checkpoint, state as JSON.

A checkpoint directory::

    checkpoint_00000200/
        dcp/.metadata, dcp/__0_0.distcp, ...   {"model": ..., "optim": ...} tensors (DCP)
        optim_state.json                       the optimizer's non-tensor state (param_groups)
        model_config.json                      ModelConfig.to_dict()
        trainer_state.json                     TrainerState (step, sampler position, ...)
        commit.json                            written last (``jobs.train.commit``)

DCP writes one file per rank and reshards on load, so a run saved under FSDP
on 8 GPUs resumes on 4, and ``load_checkpoint_model`` reads it in one process.
Nothing is unpickled on load: DCP holds tensors only (``jobs.train.dcp_io``), its
``.metadata`` is read through an allowlist, the rest is JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
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
from jobs.train.commit import require_committed
from jobs.train.dcp_io import (
    dcp_load,
    merge,
    read_json,
    single_process_ok,
    split_tensors,
    write_json,
)
from jobs.train.expert_parallel import ExpertParallel, full_layout, local_layout
from moe_model import ModelConfig, MoETransformer

# 2: the optimizer's non-tensor state moved from DCP byte entries to optim_state.json.
FORMAT_VERSION = 2
STATE_FILE = "trainer_state.json"
MODEL_CONFIG_FILE = "model_config.json"
OPTIM_STATE_FILE = "optim_state.json"
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


def _dcp_load(state_dict: dict[str, Any], path: Path) -> None:
    dcp_load(state_dict, path / DCP_DIR, path)


def model_config_hash(cfg: ModelConfig) -> str:
    """Hash of the model's architecture alone: a resume must rebuild the same model."""
    text = json.dumps(cfg.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    model_cfg: ModelConfig,
    rank: int,
    expert_parallel: ExpertParallel | None = None,
) -> None:
    """Collective under a process group: every rank calls it with its own local ``path``.

    Expert shards are stored as the whole [E, ...] tensors they are part of (``full_layout``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = full_layout(expert_parallel, *get_state_dict(model, optimizer))
    optim_tensors, optim_rest = split_tensors(optim_sd)
    with single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_tensors}, checkpoint_id=str(path / DCP_DIR))
    if rank == 0:
        write_json(path / OPTIM_STATE_FILE, optim_rest)
        (path / MODEL_CONFIG_FILE).write_text(json.dumps(model_cfg.to_dict(), indent=2))
        (path / STATE_FILE).write_text(state.to_json())


def load_training_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    expert_parallel: ExpertParallel | None = None,
) -> TrainerState:
    """Restore model and optimizer in place (collective); returns the trainer state."""
    path = Path(path)
    model_sd, optim_sd = full_layout(expert_parallel, *get_state_dict(model, optimizer))
    if (path / OPTIM_STATE_FILE).is_file():
        optim_tensors, _ = split_tensors(optim_sd)
        both = {"model": model_sd, "optim": optim_tensors}
        _dcp_load(both, path)
        both["optim"] = merge(both["optim"], read_json(path / OPTIM_STATE_FILE))
    else:  # format 1: param_groups are DCP byte entries, decoded with weights_only=True
        both = {"model": model_sd, "optim": optim_sd}
        _dcp_load(both, path)
    both["model"], both["optim"] = local_layout(expert_parallel, both["model"], both["optim"])
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
    return read_state(path)


def load_model_weights(
    uri: str,
    model: nn.Module,
    model_cfg: ModelConfig,
    expert_parallel: ExpertParallel | None = None,
) -> None:
    """Start from another run's weights (not its optimizer or data position): ``init_from``."""
    path, temporary = local_copy(uri)
    try:
        if not temporary:
            require_committed(str(path))
        saved = json.loads((path / MODEL_CONFIG_FILE).read_text())
        if saved != model_cfg.to_dict():
            change = describe_model_change(saved, model_cfg)
            raise JobError(f"init_from {uri}: model config differs ({change})")
        model_sd, _ = full_layout(expert_parallel, get_model_state_dict(model), {})
        sd = {"model": model_sd}
        _dcp_load(sd, path)
        set_model_state_dict(model, local_layout(expert_parallel, sd["model"], {})[0])
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
    seed: int | None = None,
) -> None:
    """Refuse to continue a run on other data, another model or another seed: say which."""
    if seed is not None and state.seed != seed:
        # The data order and every step's RNG are functions of the seed: a resumed run
        # with another one would be neither run.
        raise JobError(
            f"cannot resume from {where}: train.seed changed (checkpoint {state.seed}, "
            f"now {seed}); use a new --run-name to start over"
        )
    if state.dataset_fingerprint != fingerprint:
        raise JobError(
            f"cannot resume from {where}: dataset fingerprint changed "
            f"(checkpoint {state.dataset_fingerprint}, now {fingerprint}); "
            "use a new --run-name to start over"
        )
    if state.model_config_hash != model_config_hash(model_cfg):
        change = (
            describe_model_change(saved_model, model_cfg)
            if saved_model
            else f"hash {state.model_config_hash} -> {model_config_hash(model_cfg)}"
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
    require_committed(uri)
    tmp = Path(tempfile.mkdtemp(prefix="moe-ckpt-"))
    fs.get(remote.rstrip("/") + "/", str(tmp), recursive=True)
    return tmp, True


def load_checkpoint_model(uri: str) -> tuple[MoETransformer, ModelConfig, dict[str, Any]]:
    """The model of a training checkpoint (local or s3://), in one process, on CPU, fp32."""
    path, temporary = local_copy(uri)
    try:
        if not (path / STATE_FILE).is_file():
            raise JobError(f"no checkpoint at {uri} (missing {STATE_FILE})")
        if not temporary:
            require_committed(str(path))
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
