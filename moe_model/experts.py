"""SwiGLU experts over an expert-sorted buffer, fused with the gather and the weighted combine.

Tensor names carry their shapes (the legend: moe_model/config.py).

`moe_ffn` computes  out_t = sum_k w_tk * W2_e (silu(W1_e x_t) * W3_e x_t),  e = expert(t, k),
in three steps: gather x into expert-sorted rows, run each expert on its contiguous rows,
gather each slot's row back and mix with the router weights.

Two expert kernels:
- grouped GEMM (CUDA, bf16): `torch.nn.functional.grouped_mm` with autograd, no host sync.
- a loop over experts (CPU and everything else) inside one autograd.Function whose
  hand-written backward reuses what forward gathered and computed (nothing is recomputed),
  writes every gradient straight into its final buffer (no cat/split/zero-fill of
  per-expert pieces), and turns the combine's backward into a gather instead of a scatter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_model.cpu import scratch
from moe_model.dispatch import DispatchPlan


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


def moe_ffn(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    plan: DispatchPlan,
    grouped: bool,
) -> torch.Tensor:
    weights_TK = weights_TK.to(x_TD.dtype)
    if plan.keep_N is not None:
        weights_TK = weights_TK * plan.keep_N.view_as(weights_TK)
    if grouped:
        return _grouped_ffn(x_TD, weights_TK, w13_E2FD, w2_EDF, plan)
    rows = plan.group_rows_E.tolist()
    return _LoopFFN.apply(x_TD, weights_TK, w13_E2FD, w2_EDF, plan, rows)


def _grouped_ffn(x_TD, weights_TK, w13_E2FD, w2_EDF, plan: DispatchPlan) -> torch.Tensor:
    """Rows past offsets_E[-1] come back undefined: they read a zero row and are never gathered."""
    T, K = weights_TK.shape
    mm = _grouped_mm_op()
    x_Tp1D = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
    x_PD = x_Tp1D.index_select(0, plan.src_row_P)
    h_P2F = mm(x_PD, w13_E2FD.transpose(-2, -1), offs=plan.offsets_E)
    gate_PF, up_PF = h_P2F.chunk(2, dim=-1)
    y_PD = mm(F.silu(gate_PF) * up_PF, w2_EDF.transpose(-2, -1), offs=plan.offsets_E)
    y_TKD = y_PD.index_select(0, plan.slot_row_N).view(T, K, -1)
    if plan.keep_N is not None:
        y_TKD = y_TKD.masked_fill(~plan.keep_N.view(T, K, 1), 0.0)
    return torch.bmm(weights_TK.unsqueeze(1), y_TKD).squeeze(1)


class _LoopFFN(torch.autograd.Function):
    """Saves the gathered inputs, silu(gate), the activations and the gathered expert outputs
    (~2.5x the [P, 2F] pre-activations' memory) so backward recomputes and re-gathers
    nothing; every [P, *] buffer comes from the scratch pool (warm memory, no page faults)."""

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w13_E2FD, w2_EDF, plan: DispatchPlan, rows: list[int]):
        T, K = weights_TK.shape
        D, F_ = w2_EDF.shape[1:]
        P = plan.num_rows
        x_PD = torch.index_select(x_TD, 0, plan.src_row_P, out=scratch.empty((P, D), x_TD))
        h_P2F = scratch.empty((P, 2 * F_), x_TD)
        for e, sl in _expert_slices(rows):
            torch.mm(x_PD[sl], w13_E2FD[e].t(), out=h_P2F[sl])
        silu_PF = torch.ops.aten.silu.out(h_P2F[:, :F_], out=scratch.empty((P, F_), x_TD))
        a_PF = torch.mul(silu_PF, h_P2F[:, F_:], out=scratch.empty((P, F_), x_TD))
        y_PD = scratch.empty((P, D), x_TD)
        for e, sl in _expert_slices(rows):
            torch.mm(a_PF[sl], w2_EDF[e].t(), out=y_PD[sl])
        y_ND = scratch.empty((T * K, D), x_TD)
        y_TKD = torch.index_select(y_PD, 0, plan.slot_row_N, out=y_ND).view(T, K, D)
        del y_PD
        out_TD = torch.bmm(weights_TK.unsqueeze(1), y_TKD).squeeze(1)
        ctx.save_for_backward(x_PD, weights_TK, w13_E2FD, w2_EDF, h_P2F, silu_PF, a_PF, y_TKD)
        ctx.plan, ctx.rows = plan, rows
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        x_PD, weights_TK, w13_E2FD, w2_EDF, h_P2F, silu_PF, a_PF, y_TKD = ctx.saved_tensors
        plan, rows = ctx.plan, ctx.rows
        src_row_P = plan.src_row_P
        T, K = weights_TK.shape
        D, F_ = w2_EDF.shape[1:]
        P = plan.num_rows
        grad_TD = grad_TD.contiguous()

        # Combine: out_t = sum_k w_tk y_{row(t,k)}. Each row belongs to one slot, so the row
        # gradient is a gather of the token gradient scaled by the slot's weight.
        grad_weights_TK = torch.bmm(y_TKD, grad_TD.unsqueeze(2)).squeeze(2)
        weights_Np1 = torch.cat([weights_TK.reshape(-1), weights_TK.new_zeros(1)])
        row_weight_P = weights_Np1.index_select(0, plan.slot_of_row_P)
        grad_y_PD = torch.index_select(grad_TD, 0, src_row_P, out=scratch.empty((P, D), x_PD))
        grad_y_PD.mul_(row_weight_P.unsqueeze(1))

        grad_a_PF = scratch.empty((P, F_), x_PD)
        grad_w2_EDF = scratch.empty(w2_EDF.shape, w2_EDF)
        for e, sl in _expert_slices(rows):
            torch.mm(grad_y_PD[sl], w2_EDF[e], out=grad_a_PF[sl])
            torch.mm(grad_y_PD[sl].t(), a_PF[sl], out=grad_w2_EDF[e])
        del grad_y_PD

        # h = [gate | up], a = silu(gate) * up. Saved tensors are never overwritten: a
        # retained graph may run backward again.
        gate_PF, up_PF = h_P2F[:, :F_], h_P2F[:, F_:]
        grad_h_P2F = scratch.empty((P, 2 * F_), x_PD)
        torch.mul(grad_a_PF, silu_PF, out=grad_h_P2F[:, F_:])
        grad_a_PF.mul_(up_PF)
        torch.ops.aten.silu_backward.grad_input(grad_a_PF, gate_PF, grad_input=grad_h_P2F[:, :F_])
        del grad_a_PF

        grad_x_PD = scratch.empty((P, D), x_PD)
        grad_w13_E2FD = scratch.empty(w13_E2FD.shape, w13_E2FD)
        for e, sl in _expert_slices(rows):
            torch.mm(grad_h_P2F[sl].t(), x_PD[sl], out=grad_w13_E2FD[e])
            torch.mm(grad_h_P2F[sl], w13_E2FD[e], out=grad_x_PD[sl])
        idle = [e for e, n in enumerate(rows) if n == 0]
        if idle:
            grad_w13_E2FD[idle] = 0
            grad_w2_EDF[idle] = 0
        grad_x_TD = grad_TD.new_zeros(T, D).index_add_(0, src_row_P, grad_x_PD)
        return grad_x_TD, grad_weights_TK, grad_w13_E2FD, grad_w2_EDF, None, None


def _expert_slices(rows: list[int]):
    start = 0
    for e, n in enumerate(rows):
        if n:
            yield e, slice(start, start + n)
        start += n
