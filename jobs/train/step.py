"""One optimizer step: micro-batch forward/backward, one stats all-reduce, skip or update.

The loss is the model's own (``model(inputs, targets=...)``: the LM head fused with the
cross-entropy, plus the weighted router losses, ``moe_model.loss.total_loss``), so what the
trainer optimises is what the benchmark and evaluation measure. Rows hold ``seq_len + 1``
tokens: inputs are ``row[:-1]``, targets ``row[1:]``, so no token of a packed row is wasted
on the shift.

A step whose loss (on any rank) or global gradient norm is not finite is
skipped on every rank: the decision uses all-reduced numbers, so all ranks
agree, and neither parameters nor optimizer state are touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from jobs.train.distributed import all_reduce_sum, grad_sync, world_size
from jobs.train.expert_parallel import ExpertParallel, clip_grad_norm
from jobs.train.optim import set_lr
from moe_model import MoETransformer


@dataclass
class StepResult:
    loss: float
    ce_loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float
    skipped: bool
    tokens_le: np.ndarray  # [L, E] token-slots routed, summed over micro steps and ranks
    load_imbalance_l: np.ndarray  # [L] mean over micro steps and ranks
    entropy_l: np.ndarray  # [L]


@dataclass
class Trainee:
    """The plain model (for its config and generation) and what wraps and optimises it."""

    raw: MoETransformer
    module: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    bf16: bool
    expert_parallel: ExpertParallel | None = None


def forward_loss(
    tr: Trainee, batch_BR: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """(loss, ce, aux, z, routing) of one micro batch of rows of length seq_len + 1."""
    out = tr.module(batch_BR[:, :-1], targets=batch_BR[:, 1:])
    return out.loss, out.ce_loss, out.aux_loss, out.z_loss, out.routing


def train_step(
    tr: Trainee, micro_batches: list[torch.Tensor], lr: float, grad_clip: float, poison: bool
) -> StepResult:
    accum = len(micro_batches)
    L, E = tr.raw.config.num_layers, tr.raw.config.num_experts
    # One buffer, one all-reduce: [loss, ce, aux, z, nonfinite] + tokens [L*E] + imbalance,
    # entropy [L each].
    stats = torch.zeros(5 + L * E + 2 * L, device=tr.device, dtype=torch.float32)
    for m, batch in enumerate(micro_batches):
        with grad_sync(tr.module, enabled=m == accum - 1):
            loss, ce, aux, z, routing = forward_loss(tr, batch)
            if poison and m == 0:
                loss = loss * float("nan")
            (loss / accum).backward()
        _accumulate(stats, loss, ce, aux, z, routing, L, E)
    all_reduce_sum(stats)
    world = world_size()
    ep = tr.expert_parallel
    if ep is not None:
        ep.reduce_grads()
        # Each rank of an EP group reports the whole group's expert counts.
        stats[5 : 5 + L * E] /= ep.size
    grad_norm = (
        _clip(tr.module, grad_clip) if ep is None else clip_grad_norm(tr.module, ep, grad_clip)
    )
    skipped = bool(stats[4].item() > 0) or not math.isfinite(grad_norm)
    if skipped:
        tr.optimizer.zero_grad(set_to_none=True)
        _forget_router_counts(tr.raw)
    else:
        set_lr(tr.optimizer, lr)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        tr.raw.update_router_biases(all_reduce_sum if world > 1 else None)
    return _result(stats.cpu().double().numpy(), accum * world, grad_norm, skipped, L, E)


def _accumulate(stats, loss, ce, aux, z, routing, L: int, E: int) -> None:
    with torch.no_grad():
        scalars = torch.stack([loss.detach(), ce.detach(), aux.detach(), z.detach()]).float()
        stats[4] += (~torch.isfinite(scalars)).any().float()
        stats[:4] += torch.nan_to_num(scalars, nan=0.0, posinf=0.0, neginf=0.0)
        stats[5 : 5 + L * E] += torch.stack([r.tokens_per_expert for r in routing]).flatten()
        stats[5 + L * E : 5 + L * E + L] += torch.stack([r.load_imbalance for r in routing])
        stats[5 + L * E + L :] += torch.stack([r.entropy for r in routing])


def _result(s: np.ndarray, n: int, grad_norm: float, skipped: bool, L: int, E: int) -> StepResult:
    return StepResult(
        loss=s[0] / n,
        ce_loss=s[1] / n,
        aux_loss=s[2] / n,
        z_loss=s[3] / n,
        grad_norm=grad_norm,
        skipped=skipped,
        tokens_le=s[5 : 5 + L * E].reshape(L, E),
        load_imbalance_l=s[5 + L * E : 5 + L * E + L] / n,
        entropy_l=s[5 + L * E + L :] / n,
    )


def _clip(module: nn.Module, max_norm: float) -> float:
    """Global gradient norm (clipped in place when ``max_norm`` > 0)."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _forget_router_counts(model: MoETransformer) -> None:
    """A skipped step must not steer aux-loss-free balancing either."""
    for block in model.layers:
        block.moe.router.pending_counts_E.zero_()


def perplexity(ce_loss: float) -> float:
    """exp(mean cross-entropy), logged as `val/perplexity` by training and `moe-pretrain
    evaluate` alike (capped at exp(50) so an untrained model does not overflow)."""
    return math.exp(min(ce_loss, 50.0))


@torch.no_grad()
def held_out_loss(tr: Trainee, batches: list[torch.Tensor]) -> float:
    """Mean validation cross-entropy over all ranks' batches (each batch has equal tokens)."""
    tr.module.eval()
    total = torch.zeros(2, device=tr.device, dtype=torch.float64)
    for batch in batches:
        _, ce, _, _, _ = forward_loss(tr, batch.to(tr.device, non_blocking=True))
        total[0] += ce.double()
        total[1] += 1
    tr.module.train()
    all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")
