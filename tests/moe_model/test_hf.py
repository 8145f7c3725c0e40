"""Parity with transformers' MixtralForCausalLM, both directions, on random tiny GQA configs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from moe_model import ModelConfig, MoETransformer
from moe_model.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(num_heads=4, num_kv_heads=2, num_experts=4, top_k=2),
    dict(num_heads=8, num_kv_heads=2, num_experts=8, top_k=2, hidden_size=64, tie_embeddings=True),
    dict(num_heads=4, num_kv_heads=1, num_experts=6, top_k=3, sliding_window=7),
    dict(num_heads=4, num_kv_heads=4, num_experts=4, top_k=1, sliding_window=16, num_layers=3),
]


def _config(seed: int, **overrides) -> ModelConfig:
    base = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        max_seq_len=64,
        rope_theta=10000.0 * (seed + 1),
        rms_norm_eps=1e-6,
    )
    return ModelConfig(**{**base, **overrides})


def _hf_model(cfg: ModelConfig, seed: int):
    torch.manual_seed(seed)
    hf_cfg = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.rms_norm_eps,
        sliding_window=cfg.sliding_window,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=0.2,
    )
    return transformers.MixtralForCausalLM(hf_cfg).eval()


def _ids(cfg: ModelConfig, seed: int, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(
        0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("seed", range(len(CONFIGS)))
def test_ours_to_hf_logits_match(tmp_path, seed):
    cfg = _config(seed, **CONFIGS[seed])
    torch.manual_seed(seed)
    ours = MoETransformer(cfg.replace(init_std=0.2)).eval()
    hf = transformers.MixtralForCausalLM.from_pretrained(save_hf(ours, tmp_path)).eval()
    ids = _ids(cfg, seed)
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, hf(ids).logits) <= 1e-5


@pytest.mark.parametrize("seed", range(len(CONFIGS)))
def test_hf_to_ours_logits_match(tmp_path, seed):
    cfg = _config(seed, **CONFIGS[seed])
    hf = _hf_model(cfg, seed)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.config.replace(init_std=0.02) == cfg.replace(init_std=0.02)
    ids = _ids(cfg, seed + 10)
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, hf(ids).logits) <= 1e-5


def test_save_hf_writes_hub_key_names(tmp_path):
    from safetensors import safe_open

    cfg = _config(0, **CONFIGS[0])
    save_hf(MoETransformer(cfg), tmp_path, extra_config={"eos_token_id": 5})
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w1.weight" in keys
    assert "model.layers.0.block_sparse_moe.experts.0.w3.weight" in keys
    assert "model.layers.0.block_sparse_moe.experts.2.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["eos_token_id"] == 5


def test_load_hf_reads_transformers_fused_layout(tmp_path):
    """transformers 5 holds experts fused in memory; a dump of its state_dict must load too."""
    cfg = _config(1, **CONFIGS[1])
    hf = _hf_model(cfg, 1)
    hf.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    (tmp_path / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "model.safetensors"))
    ours = load_hf(tmp_path)
    ids = _ids(cfg, 3)
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, hf(ids).logits) <= 1e-5


def test_round_trip_keeps_our_settings_and_router_bias(tmp_path):
    cfg = _config(2, **CONFIGS[2], capacity_factor=1.5, router_bias_update_rate=1e-3)
    model = MoETransformer(cfg)
    for block in model.layers:
        block.moe.router.selection_bias_E.uniform_(-0.1, 0.1)
    again = load_hf(save_hf(model, tmp_path))
    assert again.config == cfg
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("seed", [0, 2])
def test_greedy_generate_matches_hf(tmp_path, seed):
    cfg = _config(seed, **CONFIGS[seed])
    hf = _hf_model(cfg, seed)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    prompt = _ids(cfg, seed, batch=2, length=5)
    new = 20
    expected = hf.generate(
        prompt, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    got = ours.generate(prompt, max_new_tokens=new)
    assert got.shape == (2, 5 + new)
    assert torch.equal(got, expected)


def test_greedy_generate_stops_at_eos_like_hf(tmp_path):
    cfg = _config(0, **CONFIGS[0])
    hf = _hf_model(cfg, 0)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    prompt = _ids(cfg, 0, batch=2, length=5)
    free_run = ours.generate(prompt, max_new_tokens=12)
    eos = int(free_run[0, 8])
    expected = hf.generate(
        prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )
    got = ours.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(got, expected)


def test_hostile_max_position_embeddings_is_refused_before_any_table(tmp_path):
    from jobs.errors import JobError
    from jobs.service.hf_folder import load_hf_folder

    save_hf(MoETransformer(_config(0, **CONFIGS[0])), tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**9}))
    with pytest.raises(ValueError, match=r"^max_position_embeddings: must be at most 1048576, got"):
        load_hf(tmp_path)
    with pytest.raises(JobError, match=r": max_position_embeddings: must be at most 1048576"):
        load_hf_folder(tmp_path)
