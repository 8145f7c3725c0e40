"""Sparse upcycling: the MoE built from a dense Llama/Mistral computes the dense model at step 0."""

import json

import pytest
import torch
import transformers

from moe_model import ModelConfig, MoETransformer
from moe_model.hf import upcycle_dense
from moe_model.upcycle import UpcycleError, save_dense_hf

SHAPE = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
)
DENSE = {
    "llama": lambda **kw: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**SHAPE, **kw})
    ),
    "mistral": lambda **kw: transformers.MistralForCausalLM(
        transformers.MistralConfig(**{**SHAPE, **kw})
    ),
}
CASES = [
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    ("llama", dict(tie_word_embeddings=True)),
    ("mistral", dict(sliding_window=7)),
    ("mistral", dict(sliding_window=None, num_key_value_heads=1)),
]


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def _save(dense, path, shard: bool = False):
    # A few-KB shard limit makes save_pretrained write model.safetensors.index.json + shards.
    dense.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    return path


@pytest.mark.parametrize(("family", "extra"), CASES)
@pytest.mark.parametrize("experts", [(8, 2), (4, 1)])
def test_upcycled_logits_equal_the_dense_models(tmp_path, family, extra, experts):
    torch.manual_seed(len(extra))
    dense = DENSE[family](**extra).eval()
    folder = _save(dense, tmp_path / family, shard=experts == (8, 2))
    moe = upcycle_dense(folder, num_experts=experts[0], top_k=experts[1]).eval()
    assert (moe.config.num_experts, moe.config.top_k) == experts
    ids = _ids(SHAPE["vocab_size"])
    with torch.no_grad():
        want = dense(ids).logits
        got = moe(ids).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_sharded_folder_is_read_through_its_index(tmp_path):
    folder = _save(DENSE["llama"](), tmp_path / "d", shard=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (folder / "model.safetensors").exists()
    upcycle_dense(folder, num_experts=2, top_k=2)


def test_experts_are_copies_of_the_mlp_and_the_router_is_small_and_seeded(tmp_path):
    dense = DENSE["llama"]()
    folder = _save(dense, tmp_path / "d")
    moe = upcycle_dense(folder, num_experts=4, top_k=2, seed=1)
    mlp = dense.model.layers[1].mlp
    block = moe.layers[1].moe
    F = SHAPE["intermediate_size"]
    for j in range(4):
        assert torch.equal(block.w13[j, :F], mlp.gate_proj.weight)
        assert torch.equal(block.w13[j, F:], mlp.up_proj.weight)
        assert torch.equal(block.w2[j], mlp.down_proj.weight)
    router = block.router.weight
    assert 0 < router.std().item() < 0.05
    again = upcycle_dense(folder, num_experts=4, top_k=2, seed=1).layers[1].moe.router.weight
    other = upcycle_dense(folder, num_experts=4, top_k=2, seed=2).layers[1].moe.router.weight
    assert torch.equal(router, again) and not torch.equal(router, other)


def test_our_dense_model_round_trips_through_a_llama_folder(tmp_path):
    cfg = ModelConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2, num_experts=1, top_k=1, max_seq_len=64, rope_theta=1000.0, init_std=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = MoETransformer(cfg).eval()
    folder = save_dense_hf(ours, tmp_path / "dense")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    llama = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    moe = upcycle_dense(folder, num_experts=4, top_k=2).eval()
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        want = ours(ids).logits
        assert (llama(ids).logits - want).abs().max().item() <= 1e-5
        assert (moe(ids).logits - want).abs().max().item() <= 1e-5


def test_unsupported_family_is_refused_by_name(tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(UpcycleError, match="model_type 'qwen2'.*supported dense family"):
        upcycle_dense(folder)


def test_biased_attention_is_refused(tmp_path):
    folder = _save(DENSE["llama"](attention_bias=True), tmp_path / "d")
    with pytest.raises(UpcycleError, match="attention_bias"):
        upcycle_dense(folder)


def test_a_shard_outside_the_folder_is_refused(tmp_path):
    folder = _save(DENSE["llama"](), tmp_path / "d", shard=True)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    (tmp_path / "evil.safetensors").write_bytes((folder / index["weight_map"][first]).read_bytes())
    index["weight_map"][first] = "../evil.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(UpcycleError, match=r"shard '\.\./evil\.safetensors'"):
        upcycle_dense(folder)


def test_weights_that_do_not_match_config_json_are_refused(tmp_path):
    folder = _save(DENSE["llama"](), tmp_path / "d")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UpcycleError, match="w13 has shape"):
        upcycle_dense(folder)
