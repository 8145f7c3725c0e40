"""Sparse MoE feed-forward: router, dispatch, SwiGLU experts on contiguous groups, combine.

Tensor names carry their shapes (the legend: moe_model/config.py).

The dispatch-experts-combine step is replaceable (``MoE.dispatcher``): expert parallelism
(``jobs/train/expert_parallel.py``) installs one that moves the rows to the ranks holding
their experts, so this file stays single-device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moe_model.config import ModelConfig
from moe_model.dispatch import expert_capacity, plan_dispatch
from moe_model.experts import grouped_mm_supported, moe_ffn
from moe_model.router import Router, Routing, load_balancing_loss, router_z_loss
from moe_model.routing_stats import RoutingStats, compute_routing_stats

BACKENDS = ("auto", "loop", "grouped_mm")
# Grouped GEMM wants 16-byte aligned group starts for its weight-gradient (2D x 2D) case.
GROUPED_MM_ALIGN = 16


@dataclass
class ExpertsOutput:
    y_TD: torch.Tensor  # the router-weighted sum of each token's expert outputs
    routed_E: torch.Tensor  # token-slots routed to each expert by every rank sharing the experts
    local_routed_E: torch.Tensor  # this rank's part of routed_E
    dropped: torch.Tensor  # token-slots the capacity limit dropped, counted as routed_E is


Dispatcher = Callable[["MoE", torch.Tensor, Routing], ExpertsOutput]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.intermediate_size = cfg.intermediate_size
        self.capacity_factor = cfg.capacity_factor
        self.router = Router(cfg)
        # Gate (w1) and up (w3) projections fused row-wise, gate first, as HF's `gate_up_proj`.
        self.w13 = nn.Parameter(
            torch.empty(cfg.num_experts, 2 * cfg.intermediate_size, cfg.hidden_size)
        )
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size))
        self.backend = "auto"
        self.dispatcher: Dispatcher | None = None

    def forward(
        self, x_BTD: torch.Tensor
    ) -> tuple[torch.Tensor, RoutingStats, torch.Tensor, torch.Tensor]:
        """Returns the output, detached statistics, and the differentiable aux and z losses."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(-1, D)
        routing = self.router(x_TD)
        out = (self.dispatcher or MoE.run_experts)(self, x_TD, routing)
        self.router.record_counts(out.local_routed_E)
        # f over this rank's own tokens, at every layout: data-parallel, accumulated and
        # expert-parallel runs then optimise one objective. The statistics count the group's.
        aux = load_balancing_loss(routing.probs_TE, out.local_routed_E, self.top_k)
        z = router_z_loss(routing.logits_TE)
        stats = compute_routing_stats(out.routed_E, routing.logits_TE, aux, z, out.dropped)
        return out.y_TD.view(B, T, D), stats, aux, z

    def run_experts(self, x_TD: torch.Tensor, routing: Routing) -> ExpertsOutput:
        """Sort the token-slots by expert, run every expert on its rows, combine."""
        grouped = self.use_grouped_mm(x_TD)
        capacity = None
        if self.capacity_factor is not None:
            capacity = self.capacity(x_TD.shape[0] * self.top_k)
        plan = plan_dispatch(
            routing.experts_TK, self.num_experts, capacity, GROUPED_MM_ALIGN if grouped else 1
        )
        y_TD = moe_ffn(x_TD, routing.weights_TK, self.w13, self.w2, plan, grouped)
        return ExpertsOutput(y_TD, plan.routed_E, plan.routed_E, plan.dropped)

    def capacity(self, num_slots: int) -> int:
        return expert_capacity(num_slots, self.num_experts, self.capacity_factor)

    def use_grouped_mm(self, x_TD: torch.Tensor) -> bool:
        if self.backend == "loop":
            return False
        if self.backend == "grouped_mm":
            return True
        return grouped_mm_supported(x_TD, self.w2.shape[1], self.intermediate_size)
