"""The expert-parallel MoE layer against the single-process one, on real gloo process groups.

Each of ep processes holds E / ep experts and its own T tokens; one process holding every
expert and all ep * T tokens (in rank order) is the reference (for the Switch loss, which is
each rank's own, the reference layer on each rank's tokens). Forward, routing statistics and
every gradient (inputs, router, experts) must agree, for routings that make the all-to-all
uneven: a rank that sends nothing to another, an expert with no tokens, a rank whose slots
the capacity limit drops altogether.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.train.expert_parallel import (
    ExpertParallelDispatch,
    Traffic,
    expert_slice,
    shard_experts,
)
from moe_model import ModelConfig
from moe_model.moe import MoE

T, D, E, K = 8, 16, 8, 2
AUX, Z = 0.1, 0.01


def layer(capacity_factor: float | None) -> MoE:
    cfg = ModelConfig(
        vocab_size=32,
        hidden_size=D,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        num_experts=E,
        top_k=K,
        capacity_factor=capacity_factor,
    )
    torch.manual_seed(0)
    moe = MoE(cfg)
    for w in (moe.router.weight, moe.w13, moe.w2):
        torch.nn.init.normal_(w, std=0.3)
    return moe


def inputs(scenario: str, ep: int, moe: MoE) -> torch.Tensor:
    """[ep * T, D] tokens, rank r's the r-th block of T. Steered scenarios route token t to
    experts (a, b) by a router that reads x's first E dimensions only."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ep * T, D, generator=g)
    if scenario == "random":
        return x
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :E] = torch.eye(E) * 4
    x[:, :E] = 0
    El = E // ep
    for t in range(ep * T):
        rank = t // T
        if scenario == "starved":  # everyone wants experts 0 and 1; rank 0 fills them
            a, b = 0, 1
        elif rank == 0:  # rank 0 keeps to its own experts: it sends nothing to the others
            a, b = t % El, (t + 1) % El
        else:  # nobody routes to the last expert
            a, b = t % (E - 1), (t + 3) % (E - 1)
        x[t, a], x[t, b] = 3.0, 2.0
    return x


def objective(y, stats_aux, z, g, scale: float):
    return (y * g).sum() + scale * (AUX * stats_aux + Z * z)


# (scenario, capacity factor): uneven random splits with and without capacity drops; rank 0
# sending nothing to the others and an expert without tokens; a rank whose slots all drop.
CASES = [("random", None), ("random", 1.0), ("skewed", None), ("starved", 1.0)]


def worker(rank: int, ep: int, out: str) -> None:
    """All cases in one process group: spawning costs more than a case."""
    store = dist.FileStore(str(Path(out, "store")), ep)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=ep)
    torch.set_num_threads(1)
    try:
        for scenario, capacity_factor in CASES:
            try:
                check(rank, ep, scenario, capacity_factor)
            except AssertionError as e:
                raise AssertionError(f"{scenario}, capacity {capacity_factor}: {e}") from None
            Path(out, f"ok-{scenario}-{capacity_factor}-{rank}").touch()
    finally:
        dist.destroy_process_group()


def check(rank: int, ep: int, scenario: str, capacity_factor) -> None:
    ref = layer(capacity_factor)
    x_all = inputs(scenario, ep, ref)
    g_all = torch.randn(ep * T, D, generator=torch.Generator().manual_seed(2))
    mine = slice(rank * T, (rank + 1) * T)

    sharded = copy.deepcopy(ref)
    keep = expert_slice(rank, ep, E)
    traffic = Traffic()
    shard_experts(sharded, keep, ExpertParallelDispatch(dist.group.WORLD, traffic))

    x_ref = x_all.clone().requires_grad_()
    y_ref, s_ref, _, z_ref = ref(x_ref.view(1, ep * T, D))
    # The Switch loss is each rank's own (as under data parallelism): the layer on each block.
    aux_blocks = [ref(x_ref[r * T : (r + 1) * T].view(1, T, D))[2] for r in range(ep)]
    aux_ref = torch.stack(aux_blocks).mean()
    objective(y_ref.view(-1, D), aux_ref, z_ref, g_all, 1.0).backward()

    x = x_all[mine].clone().requires_grad_()
    y, s, aux, z = sharded(x.view(1, T, D))
    objective(y.view(-1, D), aux, z, g_all[mine], 1.0 / ep).backward()

    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.view(-1, D), y_ref.view(-1, D)[mine], **close)
    torch.testing.assert_close(x.grad, x_ref.grad[mine], **close)
    torch.testing.assert_close(sharded.w13.grad, ref.w13.grad[keep], **close)
    torch.testing.assert_close(sharded.w2.grad, ref.w2.grad[keep], **close)
    router_grad = sharded.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    torch.testing.assert_close(router_grad, ref.router.weight.grad, **close)

    torch.testing.assert_close(s.tokens_per_expert, s_ref.tokens_per_expert)
    for name in ("load_imbalance", "cv", "dead_experts", "dropped_frac"):
        torch.testing.assert_close(getattr(s, name), getattr(s_ref, name), msg=name)
    torch.testing.assert_close(aux, aux_blocks[rank])
    means = torch.stack([z.detach(), s.entropy]) / ep
    dist.all_reduce(means)
    torch.testing.assert_close(means, torch.stack([z_ref.detach(), s_ref.entropy]))
    if scenario == "starved":  # only rank 0's slots fit, and its experts are its own
        assert float(s.dropped_frac) > 0 and traffic.bytes == 0
    if scenario == "random":
        assert traffic.bytes > 0
    if scenario == "skewed":
        assert float(s.tokens_per_expert[E - 1]) == 0


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_layer_equals_the_single_process_layer(ep, tmp_path):
    mp.spawn(worker, args=(ep, str(tmp_path)), nprocs=ep)
    done = {p.name for p in tmp_path.glob("ok-*")}
    assert done == {f"ok-{s}-{c}-{r}" for s, c in CASES for r in range(ep)}
