"""The MoE layer: dispatch against a naive per-token loop, losses by hand, capacity, balancing."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_model import ModelConfig, MoETransformer
from moe_model.dispatch import expert_capacity, plan_dispatch
from moe_model.moe import MoE
from moe_model.router import load_balancing_loss, router_z_loss


def _moe(seed=0, **overrides) -> MoE:
    cfg = ModelConfig.preset("debug", num_experts=6, top_k=2, **overrides)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def _naive(moe: MoE, x_BTD: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Token by token, slot by slot: the definition of a top-k MoE with SwiGLU experts."""
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    probs_TE = F.linear(x_TD, moe.router.weight).softmax(-1)
    F_ = moe.intermediate_size
    load = [0] * moe.num_experts
    rows = []
    for t in range(x_TD.shape[0]):
        weights, experts = probs_TE[t].topk(moe.top_k)
        weights = weights / weights.sum()
        y = torch.zeros_like(x_TD[t])
        for w, e in zip(weights, experts.tolist(), strict=True):
            load[e] += 1
            if capacity is not None and load[e] > capacity:
                continue
            h = moe.w13[e] @ x_TD[t]
            y = y + w * (moe.w2[e] @ (F.silu(h[:F_]) * h[F_:]))
        rows.append(y)
    return torch.stack(rows).view_as(x_BTD)


def _grads(moe: MoE, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor):
    tensors = [x, moe.router.weight, moe.w13, moe.w2]
    return torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_dispatch_matches_naive_forward_and_backward(backend, capacity_factor):
    moe = _moe(capacity_factor=capacity_factor)
    moe.backend = backend
    x = torch.randn(3, 11, moe.w2.shape[1], requires_grad=True)
    g = torch.randn_like(x)
    y, stats, _, _ = moe(x)
    capacity = None
    if capacity_factor is not None:
        capacity = expert_capacity(3 * 11 * moe.top_k, moe.num_experts, capacity_factor)
    y_ref = _naive(moe, x, capacity)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(moe, x, y, g), _grads(moe, x, y_ref, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_capacity_drops_are_counted_and_earlier_tokens_win():
    experts_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [2, 1]])
    plan = plan_dispatch(experts_TK, num_experts=4, capacity=2)
    assert plan.routed_E.tolist() == [4, 3, 2, 1]
    assert int(plan.dropped) == 3
    keep_TK = plan.keep_N.view(5, 2)
    assert keep_TK[:, 0].tolist() == [True, True, False, False, True]
    assert keep_TK[:, 1].tolist() == [True, True, True, True, False]


def test_dropped_fraction_reported_in_stats():
    moe = _moe(capacity_factor=0.5)
    x = torch.randn(2, 16, moe.w2.shape[1])
    _, stats, _, _ = moe(x)
    N = 2 * 16 * moe.top_k
    cap = expert_capacity(N, moe.num_experts, 0.5)
    counts = stats.tokens_per_expert
    expected = (counts - cap).clamp(min=0).sum() / N
    torch.testing.assert_close(stats.dropped_frac, expected)
    assert stats.dropped_frac > 0


def test_grouped_layout_pads_groups_to_alignment():
    experts_TK = torch.tensor([[0, 2], [2, 0], [2, 1]])
    plan = plan_dispatch(experts_TK, num_experts=4, align=16)
    assert plan.group_rows_E.tolist() == [16, 16, 16, 0]
    assert plan.offsets_E.tolist() == [16, 32, 48, 48]
    assert plan.num_rows == 6 + 4 * 15
    T = experts_TK.shape[0]
    for n, row in enumerate(plan.slot_row_N.tolist()):
        assert plan.src_row_P[row] == n // 2
    assert (plan.src_row_P == T).sum() == plan.num_rows - 6


def test_load_balancing_loss_by_hand():
    probs_TE = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    routed_E = torch.tensor([3.0, 3.0, 2.0])  # T=4, K=2
    f = [3 / 8, 3 / 8, 2 / 8]
    P = [1.5 / 4, 1.25 / 4, 1.25 / 4]
    expected = 3 * sum(a * b for a, b in zip(f, P, strict=True))
    assert math.isclose(
        load_balancing_loss(probs_TE, routed_E, top_k=2).item(), expected, rel_tol=1e-6
    )
    uniform = torch.full((5, 4), 0.25)
    assert math.isclose(
        load_balancing_loss(uniform, torch.full((4,), 2.5), 2).item(), 1.0, rel_tol=1e-6
    )


def test_z_loss_by_hand():
    logits_TE = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.e + math.e**2)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    assert math.isclose(router_z_loss(logits_TE).item(), expected, rel_tol=1e-6)


def test_model_losses_are_layer_means_of_per_layer_values():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("debug", num_layers=3))
    ids = torch.randint(0, 512, (2, 12))
    out = model(ids, labels=ids)
    torch.testing.assert_close(
        out.aux_loss.detach(), torch.stack([s.aux_loss for s in out.routing]).mean()
    )
    torch.testing.assert_close(
        out.z_loss.detach(), torch.stack([s.z_loss for s in out.routing]).mean()
    )
    logits = out.logits[:, :-1].reshape(-1, 512)
    torch.testing.assert_close(out.ce_loss, F.cross_entropy(logits, ids[:, 1:].reshape(-1)))


def test_routing_stats_values():
    moe = _moe()
    x = torch.randn(1, 30, moe.w2.shape[1])
    _, stats, aux, z = moe(x)
    counts = stats.tokens_per_expert
    assert counts.sum() == 60
    torch.testing.assert_close(stats.load_imbalance, counts.max() / counts.mean())
    torch.testing.assert_close(stats.cv, counts.std(unbiased=False) / counts.mean())
    assert stats.dead_experts == (counts == 0).sum()
    probs = F.linear(x.reshape(30, -1), moe.router.weight).softmax(-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(stats.entropy, entropy.detach())
    assert 0 < stats.entropy <= math.log(moe.num_experts)
    torch.testing.assert_close(stats.aux_loss, aux.detach())


def test_aux_free_bias_steers_selection_and_updates_outside_autograd():
    moe = _moe(router_bias_update_rate=0.05)
    x = torch.randn(2, 20, moe.w2.shape[1])
    moe.train()
    _, stats, _, _ = moe(x)
    counts = stats.tokens_per_expert
    moe.router.update_bias()
    bias = moe.router.selection_bias_E
    torch.testing.assert_close(bias, 0.05 * torch.sign(counts.mean() - counts))
    assert not bias.requires_grad
    assert moe.router.pending_counts_E.sum() == 0
    moe.router.selection_bias_E.zero_()
    moe.router.selection_bias_E[0] = 10.0
    _, stats, _, _ = moe(x)
    assert stats.tokens_per_expert[0] == 40


def test_update_router_biases_is_a_no_op_when_off_and_reduces_counts_when_on():
    torch.manual_seed(0)
    off = MoETransformer(ModelConfig.preset("debug"))
    ids = torch.randint(0, 512, (2, 12))
    off(ids)
    off.update_router_biases()
    assert all(b.moe.router.selection_bias_E.abs().sum() == 0 for b in off.layers)
    on = MoETransformer(ModelConfig.preset("debug", router_bias_update_rate=1e-2))
    on(ids)
    seen = []
    on.update_router_biases(all_reduce=lambda t: (seen.append(t.shape), t.mul_(2)))
    assert seen == [(2, 4)]
    assert any(b.moe.router.selection_bias_E.abs().sum() > 0 for b in on.layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_on_cuda_matches_loop_in_bf16():
    moe = _moe(hidden_size=128, intermediate_size=256, num_heads=4).cuda().bfloat16()
    x = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    moe.backend = "auto"
    y, _, _, _ = moe(x)
    assert moe.use_grouped_mm(x.view(-1, 128))
    grads = _grads(moe, x, y, g)
    moe.backend = "loop"
    y_ref, _, _, _ = moe(x)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, _grads(moe, x, y_ref, g), strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_pooled_buffers_across_steps_and_retained_graphs(monkeypatch):
    """With every buffer pooled, repeated steps and a second backward through a retained
    graph still give the naive reference's gradients (saved tensors are never reused)."""
    from moe_model.cpu import hugepages, scratch

    monkeypatch.setattr(scratch, "MIN_BYTES", 1)
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1)
    with scratch.scope() as pool:
        _pooled_steps(_moe())
    assert pool.hits > 0  # the second step reused the first one's released buffers


def _pooled_steps(moe):
    moe.backend = "loop"
    x = torch.randn(3, 11, moe.w2.shape[1], requires_grad=True)
    g = torch.randn_like(x)
    y_ref = _naive(moe, x)
    expected = _grads(moe, x, y_ref, g)
    for _ in range(2):
        y, _, _, _ = moe(x)
        first = torch.autograd.grad(
            y, [x, moe.router.weight, moe.w13, moe.w2], g, retain_graph=True
        )
        moe(torch.randn_like(x))[0].sum().backward()  # another step in between
        second = _grads(moe, x, y, g)
        for a, b, c in zip(first, second, expected, strict=True):
            torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(b, c, atol=1e-4, rtol=1e-4)
