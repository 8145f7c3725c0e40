import math

import pytest
import torch

from moe_model import ModelConfig, MoETransformer
from moe_model.config import ModelConfigError
from moe_model.presets import PRESETS


@pytest.mark.parametrize("name", ["debug", "tiny", "small"])
def test_param_counts_match_built_module(name):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert cfg.num_params() == total
    expert_numel = sum(b.moe.w13.numel() + b.moe.w2.numel() for b in model.layers)
    idle = expert_numel * (cfg.num_experts - cfg.top_k) // cfg.num_experts
    assert cfg.num_active_params() == total - idle


@pytest.mark.parametrize("name", ["debug", "tiny", "small", "mixtral-8x7b"])
def test_dense_equivalent_has_the_same_active_params_within_one_percent(name):
    moe = ModelConfig.preset(name)
    dense = moe.dense_equivalent()
    assert (dense.num_experts, dense.top_k) == (1, 1)
    assert dense.intermediate_size == moe.top_k * moe.intermediate_size
    with torch.device("meta"):
        built = MoETransformer(dense)
    # One expert, always chosen: every parameter of the dense model is active.
    assert (
        dense.num_active_params()
        == dense.num_params()
        == sum(p.numel() for p in built.parameters())
    )
    assert abs(dense.num_active_params() / moe.num_active_params() - 1) < 0.01
    assert abs(dense.flops_per_token(256) / moe.flops_per_token(256) - 1) < 0.01
    assert dense.num_params() < moe.num_params()


def test_mixtral_8x7b_matches_published_size():
    cfg = ModelConfig.preset("mixtral-8x7b")
    with torch.device("meta"):
        model = MoETransformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert cfg.num_params() == total
    assert abs(cfg.num_params() / 1e9 - 46.7) < 0.1
    assert abs(cfg.num_active_params() / 1e9 - 12.9) < 0.1


def test_preset_sizes_are_in_their_advertised_ranges():
    assert 10e6 <= ModelConfig.preset("tiny").num_params() <= 20e6
    small = ModelConfig.preset("small")
    assert 0.9e9 <= small.num_params() <= 1.1e9
    assert 0.25e9 <= small.num_active_params() <= 0.35e9


def test_flops_per_token_is_six_times_matmul_params_plus_attention():
    cfg = ModelConfig.preset("debug")
    matmul = cfg.num_active_params() - cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 100
    assert cfg.flops_per_token(100) == 6 * matmul + attention
    windowed = cfg.replace(sliding_window=10)
    assert windowed.flops_per_token(100) == 6 * matmul + attention / 10


def test_dict_round_trip_is_json_safe():
    import json

    cfg = ModelConfig.preset("tiny", capacity_factor=1.25, sliding_window=64)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.head_dim == cfg.hidden_size // cfg.num_heads


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"top_k": 9}, "top_k"),
        ({"hidden_size": 100, "num_heads": 8}, "hidden_size"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_layers": 2.5}, "num_layers"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"init_std": float("nan")}, "init_std"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
        ({"router_bias_update_rate": -1e-3}, "router_bias_update_rate"),
        ({"tie_embeddings": "yes"}, "tie_embeddings"),
        ({"max_seq_len": 10**9}, "max_seq_len"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(change, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        ModelConfig.preset("debug", **change)


def test_top_k_message_names_the_limit():
    with pytest.raises(ValueError, match=r"^top_k: must be <= num_experts \(8\), got 9$"):
        ModelConfig(num_experts=8, top_k=9)


def test_the_error_carries_the_field_and_the_problem():
    with pytest.raises(ModelConfigError) as e:
        ModelConfig.preset("debug", num_kv_heads=3)
    assert e.value.field == "num_kv_heads" and e.value.problem.startswith("must divide num_heads")


def test_unknown_preset_and_unknown_field_are_rejected():
    with pytest.raises(ValueError, match="^preset: unknown name 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="^hidden: not a ModelConfig field"):
        ModelConfig.from_dict({"hidden": 3})


def test_every_preset_validates():
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        assert cfg.head_dim * cfg.num_heads == cfg.hidden_size
        assert math.isfinite(cfg.flops_per_token(cfg.max_seq_len))
