"""Per-layer routing statistics: detached tensors, a handful of [E]-sized ops per step.

Tensor names carry their shapes (the legend: moe_model/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RoutingStats:
    tokens_per_expert: torch.Tensor  # [E] float, token-slots routed (before capacity drops)
    load_imbalance: torch.Tensor  # max / mean of tokens_per_expert; 1.0 = perfectly balanced
    cv: torch.Tensor  # coefficient of variation (population std / mean) of tokens_per_expert
    dead_experts: torch.Tensor  # number of experts that received no token
    entropy: torch.Tensor  # mean entropy (nats) of the router's softmax over experts
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped_frac: torch.Tensor  # fraction of token-slots dropped by the capacity limit

    def scalars(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "tokens_per_expert"
        }


@torch.no_grad()
def compute_routing_stats(
    routed_E: torch.Tensor,
    logits_TE: torch.Tensor,
    aux_loss: torch.Tensor,
    z_loss: torch.Tensor,
    dropped: torch.Tensor,
) -> RoutingStats:
    counts_E = routed_E.detach().float()
    mean = counts_E.mean()
    log_probs_TE = torch.log_softmax(logits_TE.detach().float(), dim=-1)
    entropy = -(log_probs_TE.exp() * log_probs_TE).sum(dim=-1).mean()
    return RoutingStats(
        tokens_per_expert=counts_E,
        load_imbalance=counts_E.max() / mean,
        cv=counts_E.std(unbiased=False) / mean,
        dead_experts=(counts_E == 0).sum().float(),
        entropy=entropy,
        aux_loss=aux_loss.detach().float(),
        z_loss=z_loss.detach().float(),
        dropped_frac=dropped.float() / counts_E.sum(),
    )


# Metric names where they differ from the RoutingStats field: the names the README's
# tracking table documents, used by the trainer, evaluation and ``routing_metrics``.
METRIC_NAMES = {"entropy": "router_entropy"}


def metric_key(stat: str, layer: int | None = None, prefix: str = "moe") -> str:
    """``moe/layer_03/router_entropy`` for one layer, ``moe/router_entropy`` for all layers."""
    name = METRIC_NAMES.get(stat, stat)
    return f"{prefix}/{name}" if layer is None else f"{prefix}/layer_{layer:02d}/{name}"


def routing_metrics(routing: list[RoutingStats], prefix: str = "moe") -> dict[str, float]:
    """Per-layer floats keyed by ``metric_key`` plus their layer means (one sync)."""
    names = list(routing[0].scalars()) if routing else []
    if not names:
        return {}
    table_LM = torch.stack([torch.stack(list(s.scalars().values())) for s in routing]).cpu()
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        out[metric_key(name, prefix=prefix)] = float(table_LM[:, j].mean())
        for i in range(table_LM.shape[0]):
            out[metric_key(name, i, prefix)] = float(table_LM[i, j])
    return out
