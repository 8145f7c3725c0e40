"""Expert parallelism: each rank of a group holds E / ep experts of every layer, and the
token rows travel to them and back by all-to-all.

Applied from outside to the single-device model, as FSDP is (``distributed.py``):
``apply_expert_parallel`` keeps this rank's slice of every layer's ``w13`` / ``w2`` and installs
an ``ExpertParallelDispatch`` as the layer's dispatcher (``moe_model.moe.MoE.dispatcher``).

Two device meshes, as in torchtitan (``parallelisms/parallel_dims.py``): the dense weights stay
data-parallel over all W ranks; the expert weights live on a ``(dp, ep)`` mesh of shape
``(W / ep, ep)``: sharded along ``ep`` (the ranks of one group hold different experts) and
replicated along ``dp`` (the same slice in every group), so their gradients are summed over
``dp`` only.

The layer's output on each rank is what the single-device layer computes for these tokens
within the concatenation of the group's tokens in rank order: same routing, the statistics
from the group's per-expert counts, and capacity per expert over the group, taken in that
order (earlier ranks' slots win, as earlier tokens do in one process; GShard's
position-in-expert, Lepikhin et al. 2020, sec. 2.2). The Switch loss keeps each rank's own
fraction f (``moe_model/moe.py``), so that EP 1 and EP N optimise the same objective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_model import MoETransformer
from moe_model.dispatch import DispatchPlan, plan_dispatch
from moe_model.experts import moe_ffn
from moe_model.moe import GROUPED_MM_ALIGN, ExpertsOutput, MoE
from moe_model.router import Routing

EXPERT_WEIGHTS = ("w13", "w2")


class _AllToAll(torch.autograd.Function):
    """Variable-split ``all_to_all_single`` whose backward is the same exchange reversed.

    The tensor form, not the list form: gloo implements uneven splits only for it."""

    @staticmethod
    def forward(ctx, x_PD, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out_PD = x_PD.new_empty((sum(out_splits), *x_PD.shape[1:]))
        dist.all_to_all_single(out_PD, x_PD.contiguous(), out_splits, in_splits, group=group)
        return out_PD

    @staticmethod
    def backward(ctx, grad_PD):
        out_splits, in_splits = ctx.splits
        grad_in_PD = grad_PD.new_empty((sum(in_splits), *grad_PD.shape[1:]))
        dist.all_to_all_single(
            grad_in_PD, grad_PD.contiguous(), in_splits, out_splits, group=ctx.group
        )
        return grad_in_PD, None, None, None


def all_to_all(x_PD, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x_PD, out_splits, in_splits, group)


@dataclass
class Traffic:
    """Bytes this rank sent to other ranks by all-to-all, and the seconds spent in them."""

    bytes: int = 0
    seconds: float = 0.0


class ExpertParallelDispatch:
    """``MoE.dispatcher`` for one rank of an expert-parallel group (``group``, size ep)."""

    def __init__(self, group, traffic: Traffic | None = None) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.traffic = traffic if traffic is not None else Traffic()

    def __call__(self, moe: MoE, x_TD: torch.Tensor, routing: Routing) -> ExpertsOutput:
        ep, rank = self.size, self.rank
        E, El = moe.num_experts, moe.w13.shape[0]
        local_E = torch.bincount(routing.experts_TK.reshape(-1), minlength=E)
        counts_RE = self.gather_counts(local_E)
        routed_E, kept_RE, capacity_E = counts_RE.sum(0), counts_RE, None
        dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)
        if moe.capacity_factor is not None:
            cap = moe.capacity(int(routed_E.sum()))
            before_RE = counts_RE.cumsum(0) - counts_RE  # slots of earlier ranks, per expert
            kept_RE = (cap - before_RE).clamp(min=0).minimum(counts_RE)
            capacity_E = (cap - before_RE[rank]).clamp(min=0)
            dropped = (routed_E - cap).clamp(min=0).sum()
        # Slots sorted by expert: the rows for rank j's experts are one contiguous block.
        plan = plan_dispatch(routing.experts_TK, E, capacity_E)
        send = kept_RE[rank].view(ep, El).sum(1).tolist()
        mine_RL = kept_RE[:, rank * El : (rank + 1) * El]  # rows each rank sends my experts
        recv = mine_RL.sum(1).tolist()

        x_PD = x_TD.index_select(0, plan.src_row_P)
        x_recv_PD = self.exchange(x_PD, recv, send)
        y_recv_PD = self.run_local_experts(moe, x_recv_PD, mine_RL)
        y_PD = self.exchange(y_recv_PD, send, recv)
        y_TD = combine(y_PD, routing.weights_TK, plan)
        return ExpertsOutput(y_TD, routed_E, local_E, dropped)

    def gather_counts(self, local_E: torch.Tensor) -> torch.Tensor:
        """[ep, E]: every rank's slots per expert. One small all-reduce gives each rank the
        split sizes of both exchanges, the global counts and the capacity order at once."""
        counts_RE = local_E.new_zeros(self.size, local_E.shape[0])
        counts_RE[self.rank] = local_E
        dist.all_reduce(counts_RE, group=self.group)
        return counts_RE

    def exchange(self, x_PD, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """Forward exchanges are counted (backward sends as many bytes again). On CPU the time
        includes waiting for the group's slowest rank (gloo's all-to-all blocks); on CUDA it
        is the launch only."""
        start = time.perf_counter()
        out = all_to_all(x_PD, out_splits, in_splits, self.group)
        self.traffic.seconds += time.perf_counter() - start
        row_bytes = x_PD.shape[1] * x_PD.element_size()
        self.traffic.bytes += (sum(in_splits) - in_splits[self.rank]) * row_bytes
        return out

    @staticmethod
    def run_local_experts(moe: MoE, x_recv_PD: torch.Tensor, mine_RL: torch.Tensor):
        """The received rows come by source rank, then expert. The single-device grouping
        (``plan_dispatch``, stable) regroups them by expert with the kernels' alignment, and
        ``moe_ffn`` with one slot of weight 1 per row is then just the experts on those rows."""
        El = mine_RL.shape[1]
        experts_P = torch.arange(El, device=x_recv_PD.device).repeat(mine_RL.shape[0])
        experts_P1 = experts_P.repeat_interleave(mine_RL.reshape(-1)).unsqueeze(1)
        grouped = moe.use_grouped_mm(x_recv_PD)
        inner = plan_dispatch(experts_P1, El, None, GROUPED_MM_ALIGN if grouped else 1)
        ones_P1 = x_recv_PD.new_ones(x_recv_PD.shape[0], 1)
        # Cast for bf16 compute: FSDP's mixed precision does not manage these weights.
        w13, w2 = moe.w13.to(x_recv_PD.dtype), moe.w2.to(x_recv_PD.dtype)
        return moe_ffn(x_recv_PD, ones_P1, w13, w2, inner, grouped)


def combine(y_PD: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """out_t = sum_k w_tk y_row(t,k), dropped slots reading an appended zero row."""
    T, K = weights_TK.shape
    weights_TK = weights_TK.to(y_PD.dtype)
    rows_N = plan.slot_row_N
    if plan.keep_N is not None:
        weights_TK = weights_TK * plan.keep_N.view_as(weights_TK)
        rows_N = torch.where(plan.keep_N, rows_N, y_PD.shape[0])
    y_Pp1D = torch.cat([y_PD, y_PD.new_zeros(1, y_PD.shape[1])])
    y_TKD = y_Pp1D.index_select(0, rows_N).view(T, K, -1)
    return torch.bmm(weights_TK.unsqueeze(1), y_TKD).squeeze(1)


def expert_slice(rank: int, ep: int, num_experts: int) -> slice:
    per = num_experts // ep
    return slice(rank * per, (rank + 1) * per)


@dataclass
class ExpertParallel:
    """What the trainer needs after ``apply_expert_parallel``: the meshes and the sharded
    parameters, by their fully-qualified names in the plain model."""

    mesh: object  # DeviceMesh (dp, ep)
    params: dict[str, nn.Parameter]
    world: int
    traffic: Traffic

    @property
    def size(self) -> int:
        return self.mesh["ep"].size()

    @property
    def ep_group(self):
        return self.mesh["ep"].get_group()

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group()

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Mean over all W ranks' losses, as DDP gives the dense weights. A rank's expert
        gradient already sums its group's tokens (the all-to-all's backward brought them), so
        summing over ``dp`` and dividing by W is the mean over every rank's loss."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if self.mesh["dp"].size() > 1:
            for g in grads:
                dist.all_reduce(g, group=self.dp_group)
        for g in grads:
            g.div_(self.world)


def apply_expert_parallel(model: MoETransformer, ep: int, device: torch.device) -> ExpertParallel:
    """Keep this rank's experts in every layer and dispatch by all-to-all (collective)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    rank = mesh["ep"].get_local_rank()
    keep = expert_slice(rank, ep, model.config.num_experts)
    traffic = Traffic()
    dispatcher = ExpertParallelDispatch(mesh["ep"].get_group(), traffic)
    params: dict[str, nn.Parameter] = {}
    for i, block in enumerate(model.layers):
        for name, local in shard_experts(block.moe, keep, dispatcher).items():
            params[f"layers.{i}.moe.{name}"] = local
    return ExpertParallel(mesh, params, world, traffic)


def shard_experts(
    moe: MoE, keep: slice, dispatcher: ExpertParallelDispatch
) -> dict[str, nn.Parameter]:
    """Replace the layer's expert weights by their rows ``keep`` and route through ``dispatcher``."""
    out = {}
    for name in EXPERT_WEIGHTS:
        out[name] = nn.Parameter(getattr(moe, name).detach()[keep].clone())
        setattr(moe, name, out[name])
    moe.dispatcher = dispatcher
    return out


def clip_grad_norm(module: nn.Module, ep: ExpertParallel, max_norm: float) -> float:
    """The global gradient norm with expert shards (clipped in place when ``max_norm`` > 0).

    Dense gradients are whole (DDP) or DTensors (FSDP) and give their norm as usual; the expert
    shards of one group are disjoint and every group holds the same ones after
    ``reduce_grads``, so their squares are summed over ``ep`` only (torchtitan's EP clipping
    does the same split)."""
    experts = {id(p) for p in ep.params.values()}
    dense = [p.grad for p in module.parameters() if p.grad is not None and id(p) not in experts]
    sharded = [p.grad for p in ep.params.values() if p.grad is not None]
    dense_norm = torch.nn.utils.get_total_norm(dense) if dense else torch.zeros(())
    if hasattr(dense_norm, "full_tensor"):
        dense_norm = dense_norm.full_tensor()
    sq = torch.zeros((), dtype=torch.float64, device=dense_norm.device)
    for g in sharded:
        sq += g.double().square().sum()
    dist.all_reduce(sq, group=ep.ep_group)
    total = float((dense_norm.double() ** 2 + sq).sqrt())
    if max_norm > 0 and total == total:
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in dense + sharded:
                g.mul_(coef)
    return total


@torch.no_grad()
def full_layout(ep: ExpertParallel | None, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
    """State dicts whose expert entries are DTensors of the whole [E, ...] weight, so DCP
    stores them by FQN at full shape: a checkpoint that any layout (or one process) reads."""
    if ep is None:
        return model_sd, optim_sd
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def wrap(t):
        return DTensor.from_local(t, ep.mesh, [Replicate(), Shard(0)], run_check=False)

    return _map_expert_entries(ep, model_sd, optim_sd, wrap)


def local_layout(ep: ExpertParallel | None, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
    """The inverse of ``full_layout``: this rank's shards of the expert entries."""
    if ep is None:
        return model_sd, optim_sd
    return _map_expert_entries(ep, model_sd, optim_sd, lambda t: t.to_local())


def _map_expert_entries(ep: ExpertParallel, model_sd: dict, optim_sd: dict, fn):
    """Apply ``fn`` to each expert weight and to its optimizer moments (not its 0-dim step)."""
    model_sd = {k: fn(v) if k in ep.params else v for k, v in model_sd.items()}
    if "state" not in optim_sd:
        return model_sd, optim_sd
    state = dict(optim_sd["state"])
    for fqn in ep.params:
        if fqn in state:
            state[fqn] = {
                k: fn(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                for k, v in state[fqn].items()
            }
    return model_sd, {**optim_sd, "state": state}
