"""Lossless conversion to and from Hugging Face Mixtral checkpoints (config.json + safetensors).

Writes the hub layout (`model.layers.{i}.block_sparse_moe.experts.{j}.w1/w2/w3.weight`), which
every transformers version loads; reads that layout and transformers 5's fused one
(`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]), single-file or
sharded. Needs only torch, safetensors and json: transformers is not imported.
``upcycle_dense`` (moe_model/upcycle.py) builds the MoE from a dense Llama or Mistral folder.

Tensor names carry their shapes (the legend: moe_model/config.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_model.config import MAX_SEQ_LEN, ModelConfig
from moe_model.model import MoETransformer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Our own settings that Mixtral's config has no field for; HF keeps unknown keys as attributes.
EXTRA_KEY = "moe_pretrain"
# Aux-loss-free selection bias (not part of HF Mixtral, which ignores the key on load).
BIAS_SUFFIX = "block_sparse_moe.gate.selection_bias"

LAYER_RENAMES = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "moe_norm.weight": "post_attention_layernorm.weight",
    "moe.router.weight": "block_sparse_moe.gate.weight",
}


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "router_jitter_noise": 0.0,
        "use_cache": True,
        EXTRA_KEY: cfg.to_dict(),
    }


def to_hf_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    cfg = model.config
    F = cfg.intermediate_size
    ours = model.state_dict()
    out = {
        "model.embed_tokens.weight": ours["embed.weight"],
        "model.norm.weight": ours["norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for a, b in LAYER_RENAMES.items():
            out[dst + b] = ours[src + a]
        w13_E2FD, w2_EDF = ours[src + "moe.w13"], ours[src + "moe.w2"]
        for j in range(cfg.num_experts):
            expert = f"{dst}block_sparse_moe.experts.{j}."
            out[expert + "w1.weight"] = w13_E2FD[j, :F]
            out[expert + "w3.weight"] = w13_E2FD[j, F:]
            out[expert + "w2.weight"] = w2_EDF[j]
        if cfg.router_bias_update_rate > 0:
            out[dst + BIAS_SUFFIX] = ours[src + "moe.router.selection_bias_E"]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save_hf(
    model: MoETransformer,
    path: str | Path,
    dtype: torch.dtype | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write `config.json` + `model.safetensors` that `MixtralForCausalLM.from_pretrained` loads.

    `extra_config` adds keys such as `bos_token_id` / `eos_token_id` / `pad_token_id`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    config = hf_config(model.config)
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config.update(extra_config or {})
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a Mixtral config.json onto ModelConfig, refusing what the model cannot represent."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: only 'silu' is supported, got {hf['hidden_act']!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_parameters: only the default RoPE is supported, got {rope_type!r}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))
    num_heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * num_heads != hidden:
        raise ValueError(f"head_dim: must equal hidden_size / num_attention_heads, got {head_dim}")
    positions = hf.get("max_position_embeddings", 4096)
    if isinstance(positions, int) and positions > MAX_SEQ_LEN:
        raise ValueError(f"max_position_embeddings: must be at most {MAX_SEQ_LEN}, got {positions}")
    base = dict(hf.get(EXTRA_KEY) or {})
    base.update(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        num_experts=hf["num_local_experts"],
        top_k=hf["num_experts_per_tok"],
        rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_seq_len=positions,
        sliding_window=hf.get("sliding_window"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if EXTRA_KEY not in hf:
        base["init_std"] = float(hf.get("initializer_range", 0.02))
    return ModelConfig.from_dict(base)


def load_hf(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> MoETransformer:
    """Read a Mixtral directory (hub download or `save_pretrained` output) into MoETransformer."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"path: no config.json in {path}")
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    hub = _read_safetensors(path)
    state = from_hf_state_dict(hub, cfg)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("selection_bias_E")]
    if missing or unexpected:
        raise ValueError(f"weights: missing {missing[:3]}, unexpected {unexpected[:3]} in {path}")
    _materialize_buffers(model, torch.device(device))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def from_hf_state_dict(hub: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {
        "embed.weight": hub.pop("model.embed_tokens.weight"),
        "norm.weight": hub.pop("model.norm.weight"),
    }
    lm_head = hub.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if lm_head is None:
            raise ValueError("lm_head.weight: missing while tie_word_embeddings is false")
        out["lm_head.weight"] = lm_head
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for ours, theirs in LAYER_RENAMES.items():
            key = src + theirs
            if key not in hub:
                key = key.replace("block_sparse_moe.", "mlp.")
            out[dst + ours] = hub.pop(key)
        out[dst + "moe.w13"], out[dst + "moe.w2"] = _pop_experts(hub, src, cfg.num_experts)
        bias = hub.pop(src + BIAS_SUFFIX, None)
        if bias is not None:
            out[dst + "moe.router.selection_bias_E"] = bias
    if hub:
        raise ValueError(f"weights: unexpected tensor {sorted(hub)[0]}")
    return out


def _pop_experts(hub: dict[str, torch.Tensor], src: str, num_experts: int):
    fused = src + "mlp.experts.gate_up_proj"
    if fused in hub:
        return hub.pop(fused), hub.pop(src + "mlp.experts.down_proj")
    w13, w2 = [], []
    for j in range(num_experts):
        expert = f"{src}block_sparse_moe.experts.{j}."
        w1, w3 = hub.pop(expert + "w1.weight"), hub.pop(expert + "w3.weight")
        w13.append(torch.cat([w1, w3]))
        w2.append(hub.pop(expert + "w2.weight"))
    return torch.stack(w13), torch.stack(w2)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / INDEX).is_file():
        files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        for name in files:  # the index may name files of this folder only
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"{INDEX}: weight file {name!r} is not a file name in {path}")
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise FileNotFoundError(f"path: no {WEIGHTS} or {INDEX} in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    return tensors


def _materialize_buffers(model: MoETransformer, device: torch.device) -> None:
    """Buffers not in the checkpoint were built on the meta device: allocate and fill them."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(
                    name, torch.zeros(buf.shape, device=device), persistent=persistent
                )
    model.rope.reset_tables()


def __getattr__(name: str):
    # ``moe_model.hf.upcycle_dense`` lives in moe_model/upcycle.py, which imports this module.
    if name == "upcycle_dense":
        from moe_model.upcycle import upcycle_dense

        return upcycle_dense
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
