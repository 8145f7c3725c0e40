"""Sparse upcycling: a Mixtral-style MoE from a dense Llama or Mistral checkpoint.

Komatsuzaki et al. 2022 (arXiv:2212.05055), "Sparse Upcycling": embeddings, attention,
norms and head are copied; every expert starts as a copy of the dense MLP (gate = w1,
up = w3, down = w2) and the router starts small and random. The router's top-k weights are
renormalised to sum to 1 and all experts are equal, so at step 0 the MoE computes exactly
the dense model's function; training then lets the experts drift apart.

Reads ``config.json`` + ``model.safetensors`` (or a sharded ``model.safetensors.index.json``);
nothing is unpickled. ``save_dense_hf`` writes a one-expert MoETransformer as such a folder
(the dense phase of the efficacy benchmark's upcycled arm).

Tensor names carry their shapes (the legend: moe_model/config.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moe_model.config import ModelConfig
from moe_model.hf import INDEX, WEIGHTS, config_from_hf, from_hf_state_dict
from moe_model.model import MoETransformer

# model_type -> architecture: the dense families whose blocks are Mixtral's minus the MoE.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# The router starts near uniform (logits ~ 0.02 * |x|), whatever the dense model's init range.
ROUTER_INIT_STD = 0.02


class UpcycleError(ValueError):
    """A dense checkpoint that cannot become this MoE; the message names what does not fit."""


def read_dense_config(path: str | Path) -> dict[str, Any]:
    """The dense model's ``config.json``, refused unless it is a Llama or Mistral we can copy."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UpcycleError(f"upcycle: no config.json in {path}")
    try:
        hf = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UpcycleError(f"upcycle: {path / 'config.json'} is not JSON ({e})") from None
    family = hf.get("model_type") if isinstance(hf, dict) else None
    if family not in FAMILIES:
        raise UpcycleError(
            f"upcycle: model_type {family!r} in {path} is not a supported dense family "
            f"(expected one of {sorted(FAMILIES)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise UpcycleError(f"upcycle: {flag} is true in {path}; Mixtral blocks have no biases")
    return hf


def dense_model_config(hf: dict[str, Any], num_experts: int, top_k: int) -> ModelConfig:
    """The MoE ModelConfig a dense config becomes with ``num_experts`` experts of its MLP."""
    moe = {**hf, "num_local_experts": num_experts, "num_experts_per_tok": top_k}
    try:
        return config_from_hf(moe)
    except KeyError as e:
        raise UpcycleError(f"upcycle: config.json has no {e.args[0]!r}") from None
    except ValueError as e:
        raise UpcycleError(f"upcycle: {e}") from None


def read_dense_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s); shard names may not leave the folder."""
    from safetensors import safe_open

    path = Path(path)
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise UpcycleError(f"upcycle: no {WEIGHTS} or {INDEX} in {path}")
    folder = path.resolve()
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        shard = (folder / str(name)).resolve()
        if shard.parent != folder or not shard.is_file():
            raise UpcycleError(f"upcycle: shard {name!r} of {INDEX} is not a file in {path}")
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    return tensors


def upcycle_state_dict(
    dense: dict[str, torch.Tensor], cfg: ModelConfig, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Our state dict (``MoETransformer.state_dict()`` names) from a dense Llama/Mistral one.

    The router is drawn from N(0, ROUTER_INIT_STD) with ``generator``: any router gives the dense
    function at step 0, since every token's renormalised weights over equal experts sum to 1.
    """
    hub = {k: v for k, v in dense.items() if not k.endswith("rotary_emb.inv_freq")}
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}."
        for theirs, ours in _MLP.items():
            key = f"{layer}mlp.{theirs}.weight"
            if key not in hub:
                raise UpcycleError(f"upcycle: weights have no {key}")
            w = hub.pop(key)
            for j in range(cfg.num_experts):
                hub[f"{layer}block_sparse_moe.experts.{j}.{ours}.weight"] = w
        router_ED = torch.empty(cfg.num_experts, cfg.hidden_size)
        router_ED.normal_(0.0, ROUTER_INIT_STD, generator=generator)
        hub[f"{layer}block_sparse_moe.gate.weight"] = router_ED
    try:
        state = from_hf_state_dict(hub, cfg)
    except KeyError as e:
        raise UpcycleError(f"upcycle: weights have no {e.args[0]}") from None
    except ValueError as e:
        raise UpcycleError(f"upcycle: {e}") from None
    for i in range(cfg.num_layers):
        state.setdefault(f"layers.{i}.moe.router.selection_bias_E", torch.zeros(cfg.num_experts))
    _check_shapes(state, cfg)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def _check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    with torch.device("meta"):
        want = MoETransformer(cfg).state_dict()
    for name, tensor in state.items():
        if name in want and tuple(tensor.shape) != tuple(want[name].shape):
            raise UpcycleError(
                f"upcycle: {name} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(want[name].shape)}"
            )


def upcycle_dense(
    path: str | Path, num_experts: int = 8, top_k: int = 2, seed: int = 0
) -> MoETransformer:
    """A MoETransformer (fp32, CPU) whose experts all start as the dense model's MLP."""
    hf = read_dense_config(path)
    cfg = dense_model_config(hf, num_experts, top_k)
    state = upcycle_state_dict(read_dense_weights(path), cfg, torch.Generator().manual_seed(seed))
    model = MoETransformer(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def save_dense_hf(model: MoETransformer, path: str | Path) -> Path:
    """A one-expert MoETransformer as a dense HF folder (Mistral when it has a sliding window,
    else Llama) that ``LlamaForCausalLM`` / ``MistralForCausalLM.from_pretrained`` load."""
    from moe_model.hf import hf_config, to_hf_state_dict

    cfg = model.config
    if cfg.num_experts != 1:
        raise ValueError(f"num_experts: a dense model has one expert, got {cfg.num_experts}")
    family = "mistral" if cfg.sliding_window else "llama"
    config = {
        k: v
        for k, v in hf_config(cfg).items()
        if k not in ("num_local_experts", "num_experts_per_tok", "router_jitter_noise")
    }
    config.pop("moe_pretrain")
    config.update(
        architectures=[FAMILIES[family]],
        model_type=family,
        attention_bias=False,
        mlp_bias=False,
    )
    if family == "llama":
        config.pop("sliding_window")
    tensors = {}
    for key, value in to_hf_state_dict(model).items():
        if ".block_sparse_moe.gate." in key:
            continue
        for theirs, ours in _MLP.items():
            key = key.replace(f"block_sparse_moe.experts.0.{ours}.", f"mlp.{theirs}.")
        tensors[key] = value
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
