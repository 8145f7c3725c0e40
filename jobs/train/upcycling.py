"""``train.init_from: upcycle:PATH``: start the MoE from a dense Llama/Mistral HF folder.

The folder must lie inside ``storage.root`` (like every path a config names) and match
``model.*`` in everything but the experts: the run's model config stays the one the
checkpoints and the registry record, and a mismatch is refused naming each field, with the
``--set`` that would make it fit. The weights come through ``moe_model.upcycle`` (sparse
upcycling, Komatsuzaki et al. 2022); the router is seeded by ``train.seed``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import set_model_state_dict

from jobs.errors import JobError
from moe_model import ModelConfig
from moe_model.upcycle import (
    UpcycleError,
    dense_model_config,
    read_dense_config,
    read_dense_weights,
    upcycle_state_dict,
)

PREFIX = "upcycle:"
# What the dense checkpoint fixes; the expert count, top-k and the losses come from model.*.
FITTING_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "rope_theta",
    "rms_norm_eps",
    "sliding_window",
    "tie_embeddings",
)


def upcycle_source(init_from: str | None) -> str | None:
    """The dense folder of an ``upcycle:PATH`` init_from, else None."""
    if init_from and init_from.startswith(PREFIX):
        path = init_from[len(PREFIX) :]
        if not path:
            raise JobError("train.init_from: 'upcycle:' needs a folder, as upcycle:PATH")
        return path
    return None


def check_fits(path: str, model_cfg: ModelConfig) -> dict:
    """The dense config.json, if the model config can take its weights; else a JobError."""
    local, temporary = _local_copy(path, weights=False)
    try:
        hf = read_dense_config(local)
        theirs = dense_model_config(hf, model_cfg.num_experts, model_cfg.top_k)
    except UpcycleError as e:
        raise JobError(f"train.init_from {PREFIX}{path}: {e}") from None
    finally:
        if temporary:
            shutil.rmtree(local, ignore_errors=True)
    diffs = [
        f"model.{f} is {getattr(model_cfg, f)!r}, the dense model has {getattr(theirs, f)!r}"
        for f in FITTING_FIELDS
        if getattr(model_cfg, f) != getattr(theirs, f)
    ]
    if diffs:
        fix = " ".join(f"model.{f}={json.dumps(getattr(theirs, f))}" for f in _fields(diffs))
        raise JobError(
            f"train.init_from {PREFIX}{path}: the dense model does not fit: "
            f"{'; '.join(diffs)} (set {fix})"
        )
    return hf


def _fields(diffs: list[str]) -> list[str]:
    return [d.split(" ", 1)[0].removeprefix("model.") for d in diffs]


def load_upcycled_weights(path: str, module: nn.Module, model_cfg: ModelConfig, seed: int) -> None:
    """Every rank builds the same upcycled weights (same files, same seed) and loads them."""
    check_fits(path, model_cfg)
    local, temporary = _local_copy(path, weights=True)
    try:
        state = upcycle_state_dict(
            read_dense_weights(local), model_cfg, torch.Generator().manual_seed(seed)
        )
    except UpcycleError as e:
        raise JobError(f"train.init_from {PREFIX}{path}: {e}") from None
    finally:
        if temporary:
            shutil.rmtree(local, ignore_errors=True)
    set_model_state_dict(module, {k: v.float() for k, v in state.items()})


def source_identity(path: str) -> str:
    """``upcycle:PATH@hash`` of config.json and the weight files' names and sizes: the train
    step's fingerprint changes when the dense checkpoint does."""
    from pipeline.storage import filesystem

    fs, remote = filesystem(path)
    h = hashlib.sha256()
    for info in sorted(fs.ls(remote, detail=True), key=lambda i: i["name"]):
        name = info["name"].rsplit("/", 1)[-1]
        if name == "config.json" or name.endswith((".safetensors", ".json")):
            h.update(f"{name}:{info.get('size')}\n".encode())
    with fs.open(f"{remote.rstrip('/')}/config.json", "rb") as f:
        h.update(f.read())
    return f"{PREFIX}{path}@{h.hexdigest()[:16]}"


def _local_copy(path: str, weights: bool) -> tuple[Path, bool]:
    """(local folder, is_temporary): remote folders (s3://) are copied down first."""
    if "://" not in path or path.startswith("file://"):
        return Path(path.removeprefix("file://")), False
    from pipeline.storage import filesystem

    fs, remote = filesystem(path)
    tmp = Path(tempfile.mkdtemp(prefix="moe-dense-"))
    for info in fs.ls(remote, detail=True):
        name = info["name"].rsplit("/", 1)[-1]
        wanted = name == "config.json" or (weights and name.endswith((".safetensors", ".json")))
        if wanted and info.get("type") != "directory":
            fs.get(info["name"], str(tmp / name))
    return tmp, True
