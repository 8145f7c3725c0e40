"""Sparse MoE feed-forward: router, dispatch, SwiGLU experts on contiguous groups, combine.

Legend: B batch, T tokens (B*T once flattened), D hidden, F expert hidden, E experts,
K top_k, N token-slots (T*K), P rows of the expert-sorted buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_model.config import ModelConfig
from moe_model.dispatch import DispatchPlan, expert_capacity, plan_dispatch
from moe_model.router import Router, load_balancing_loss, router_z_loss
from moe_model.routing_stats import RoutingStats, compute_routing_stats

BACKENDS = ("auto", "loop", "grouped_mm")
# Grouped GEMM wants 16-byte aligned group starts for its weight-gradient (2D x 2D) case.
GROUPED_MM_ALIGN = 16


def _grouped_mm_op():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor, hidden: int, expert_hidden: int) -> bool:
    """Where the fused kernel runs: CUDA bf16, SM80+ (SM90+ for the pre-2.10 private op)."""
    if _grouped_mm_op() is None or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    if hidden % 8 or expert_hidden % 8:
        return False
    needed = (8, 0) if hasattr(F, "grouped_mm") else (9, 0)
    return torch.cuda.get_device_capability(x.device) >= needed


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
        y_PD = self._run_experts(x_TD, plan, grouped)
        y_TD = _combine(y_PD, plan, routing.weights_TK)
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

    def _run_experts(self, x_TD: torch.Tensor, plan: DispatchPlan, grouped: bool) -> torch.Tensor:
        if plan.needs_zero_row:
            x_TD = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
        x_PD = x_TD.index_select(0, plan.src_row_P)
        if grouped:
            return _experts_grouped_mm(x_PD, self.w13, self.w2, plan.offsets_E)
        return _experts_loop(x_PD, self.w13, self.w2, plan.group_rows_E.tolist())


def _swiglu(h_P2F: torch.Tensor) -> torch.Tensor:
    gate_PF, up_PF = h_P2F.chunk(2, dim=-1)
    return F.silu(gate_PF) * up_PF


def _experts_loop(
    x_PD: torch.Tensor, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor, rows: list[int]
) -> torch.Tensor:
    """One GEMM pair per expert over its contiguous slice (a loop over E, never over tokens)."""
    outs = []
    for e, x_GD in enumerate(x_PD.split(rows)):
        if x_GD.shape[0] == 0:
            continue
        outs.append(F.linear(_swiglu(F.linear(x_GD, w13_E2FD[e])), w2_EDF[e]))
    return torch.cat(outs) if outs else x_PD.new_zeros(0, w2_EDF.shape[1])


def _experts_grouped_mm(
    x_PD: torch.Tensor, w13_E2FD: torch.Tensor, w2_EDF: torch.Tensor, offsets_E: torch.Tensor
) -> torch.Tensor:
    """Two grouped GEMMs; rows past offsets_E[-1] are left undefined and never read."""
    mm = _grouped_mm_op()
    h_P2F = mm(x_PD, w13_E2FD.transpose(-2, -1), offs=offsets_E)
    return mm(_swiglu(h_P2F), w2_EDF.transpose(-2, -1), offs=offsets_E)


def _combine(y_PD: torch.Tensor, plan: DispatchPlan, weights_TK: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's K expert outputs: a gather and a [T,1,K] x [T,K,D] bmm."""
    T, K = weights_TK.shape
    y_TKD = y_PD.index_select(0, plan.slot_row_N).view(T, K, -1)
    if plan.keep_N is not None:
        y_TKD = y_TKD.masked_fill(~plan.keep_N.view(T, K, 1), 0.0)
    return torch.bmm(weights_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)
