import pytest
import torch
import torch.nn.functional as F

from moe_model import ModelConfig, MoETransformer, routing_metrics


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig.preset("debug", **overrides))


def test_forward_shapes_and_losses():
    model = _model()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 17, cfg.vocab_size)
    assert out.loss.shape == out.ce_loss.shape == out.aux_loss.shape == out.z_loss.shape == ()
    expected = out.ce_loss + cfg.aux_loss_coef * out.aux_loss + cfg.z_loss_coef * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    assert len(out.routing) == cfg.num_layers
    stats = out.routing[0]
    assert stats.tokens_per_expert.shape == (cfg.num_experts,)
    assert stats.tokens_per_expert.sum() == 3 * 17 * cfg.top_k
    assert not any(t.requires_grad for t in stats.scalars().values())
    assert model(ids).loss is None


def test_routing_metrics_use_the_tracked_names():
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    m = routing_metrics(model(ids).routing)
    for layer in ("00", "01"):
        for name in ("load_imbalance", "router_entropy", "dead_experts", "cv", "dropped_frac"):
            assert f"moe/layer_{layer}/{name}" in m
    assert m["moe/router_entropy"] == pytest.approx(
        (m["moe/layer_00/router_entropy"] + m["moe/layer_01/router_entropy"]) / 2
    )


def test_same_seed_gives_identical_weights_and_outputs():
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    ids = torch.randint(0, 512, (2, 9))
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_output_projections_are_scaled_by_depth():
    model = MoETransformer(ModelConfig.preset("debug", num_layers=8, hidden_size=256, num_heads=4))
    std = model.config.init_std
    block = model.layers[0]
    assert abs(block.attn.q_proj.weight.std().item() - std) < 0.1 * std
    assert abs(block.attn.o_proj.weight.std().item() - std / 4) < 0.1 * std / 4
    assert abs(block.moe.w2.std().item() - std / 4) < 0.1 * std / 4


def test_loss_decreases_on_a_repeated_batch():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    first = model(ids, labels=ids).loss.item()
    for _ in range(20):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert model(ids, labels=ids).loss.item() < first - 1.0


def test_labels_minus_100_are_ignored():
    model = _model()
    ids = torch.randint(0, 512, (2, 10))
    labels = ids.clone()
    labels[:, 5:] = -100
    full = model(ids[:, :5], labels=ids[:, :5]).ce_loss
    torch.testing.assert_close(model(ids, labels=labels).ce_loss, full)


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = _model(max_seq_len=16)
    with pytest.raises(ValueError, match="^max_seq_len: "):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_sliding_window_only_changes_positions_past_the_window():
    full, windowed = _model(seed=1), _model(seed=1, sliding_window=6)
    ids = torch.randint(0, 512, (2, 20))
    a, b = full(ids).logits, windowed(ids).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4


def test_kv_cache_decoding_matches_full_forward():
    model = _model(seed=2, sliding_window=5).eval()
    ids = torch.randint(0, 512, (2, 12))
    caches = model.new_kv_caches(2, 12)
    with torch.no_grad():
        steps = [model(ids[:, :7], kv_caches=caches).logits]
        steps += [model(ids[:, t : t + 1], kv_caches=caches).logits for t in range(7, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(ids).logits, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_and_top_p_near_zero_is_greedy():
    model = _model(seed=3)
    prompt = torch.randint(0, 512, (2, 4))
    sample = [
        model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(sample[0], sample[1])
    nucleus = model.generate(prompt, 8, temperature=1.0, top_p=1e-6)
    assert torch.equal(nucleus, model.generate(prompt, 8))
    assert model.training


def test_generate_rejects_bad_arguments():
    model = _model(max_seq_len=16)
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="^max_new_tokens: "):
        model.generate(prompt, 13)
    with pytest.raises(ValueError, match="^top_p: "):
        model.generate(prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="^temperature: "):
        model.generate(prompt, 2, temperature=-1.0)


def test_bfloat16_step_runs_and_stays_finite():
    model = _model(seed=5).to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_aligned_targets_with_padding_match_cross_entropy_on_the_logits():
    """`targets` are aligned with the inputs (rows of seq_len + 1: row[:-1] in, row[1:] out)."""
    model = _model(seed=6)
    rows = torch.randint(0, 512, (3, 13))
    targets = rows[:, 1:].clone()
    targets[2, 8:] = -100  # a padded row
    out = model(rows[:, :-1], targets=targets)
    assert out.logits is None
    logits = model(rows[:, :-1]).logits
    ref = F.cross_entropy(logits.reshape(-1, 512), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.ce_loss, ref)
    # HF's shifted labels, padded: position t predicts labels[t + 1].
    labels = rows[:, :-1].clone()
    labels[1, 6:] = -100
    by_labels = model(rows[:, :-1], labels=labels)
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(by_labels.ce_loss, ref)
    torch.testing.assert_close(by_labels.logits, logits)


def test_labels_and_targets_are_checked():
    model = _model()
    ids = torch.randint(0, 512, (2, 9))
    with pytest.raises(ValueError, match="^targets: pass either"):
        model(ids, labels=ids, targets=ids)
    with pytest.raises(ValueError, match=r"^targets: expected shape \(2, 9\)"):
        model(ids, targets=ids[:, 1:])
    with pytest.raises(ValueError, match=r"^labels: expected shape \(2, 9\)"):
        model(ids, labels=ids[:1])
