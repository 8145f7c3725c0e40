"""Sparse MoE feed-forward: router, dispatch, SwiGLU experts on contiguous groups, combine.

Tensor names carry their shapes (the legend: moe_model/config.py).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_model.config import ModelConfig
from moe_model.dispatch import expert_capacity, plan_dispatch
from moe_model.experts import grouped_mm_supported, moe_ffn
from moe_model.router import Router, load_balancing_loss, router_z_loss
from moe_model.routing_stats import RoutingStats, compute_routing_stats

BACKENDS = ("auto", "loop", "grouped_mm")
# Grouped GEMM wants 16-byte aligned group starts for its weight-gradient (2D x 2D) case.
GROUPED_MM_ALIGN = 16


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

    def forward(
        self, x_BTD: torch.Tensor
    ) -> tuple[torch.Tensor, RoutingStats, torch.Tensor, torch.Tensor]:
        """Returns the output, detached statistics, and the differentiable aux and z losses."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(-1, D)
        routing = self.router(x_TD)
        grouped = self._use_grouped_mm(x_TD)
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(
                x_TD.shape[0] * self.top_k, self.num_experts, self.capacity_factor
            )
        plan = plan_dispatch(
            routing.experts_TK, self.num_experts, capacity, GROUPED_MM_ALIGN if grouped else 1
        )
        self.router.record_counts(plan.routed_E)
        y_TD = moe_ffn(x_TD, routing.weights_TK, self.w13, self.w2, plan, grouped)
        aux = load_balancing_loss(routing.probs_TE, plan.routed_E, self.top_k)
        z = router_z_loss(routing.logits_TE)
        stats = compute_routing_stats(plan.routed_E, routing.logits_TE, aux, z, plan.dropped)
        return y_TD.view(B, T, D), stats, aux, z

    def _use_grouped_mm(self, x_TD: torch.Tensor) -> bool:
        if self.backend == "loop":
            return False
        if self.backend == "grouped_mm":
            return True
        return grouped_mm_supported(x_TD, self.w2.shape[1], self.intermediate_size)
