"""Dropless (or capacity-limited) token dispatch: sort token-slots by expert into contiguous groups.

Tensor names carry their shapes (the legend: moe_model/config.py).

Every index is computed once from one stable sort; forward and backward then only gather.
Row p of the expert-sorted buffer serves token-slot `slot_of_row_P[p]` (N for padding), i.e.
token `src_row_P[p]` (T for padding); token-slot n (in (t, k) order) reads its expert output
from row `slot_row_N[n]`. For grouped GEMM each group starts on a
multiple of `align` rows and the buffer is sized by an upper bound, so nothing waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    slot_of_row_P: torch.Tensor  # token-slot each row serves; N for padding rows
    src_row_P: torch.Tensor  # token index feeding each row; T (a zero row) for padding rows
    slot_row_N: torch.Tensor  # row holding each token-slot's expert output
    group_rows_E: torch.Tensor  # rows per expert group, padding included
    offsets_E: torch.Tensor  # int32 cumulative group ends (grouped GEMM `offs`)
    routed_E: torch.Tensor  # token-slots the router sent to each expert (before drops)
    keep_N: torch.Tensor | None  # False where the capacity limit dropped the slot; None = dropless
    dropped: torch.Tensor  # number of dropped token-slots (0-dim)

    @property
    def num_rows(self) -> int:
        return self.src_row_P.shape[0]


def expert_capacity(num_slots: int, num_experts: int, capacity_factor: float) -> int:
    """GShard/Switch capacity: ceil(capacity_factor * slots / experts), at least one slot."""
    return max(1, int(-(-capacity_factor * num_slots // num_experts)))


def plan_dispatch(
    experts_TK: torch.Tensor,
    num_experts: int,
    capacity: int | torch.Tensor | None = None,
    align: int = 1,
) -> DispatchPlan:
    """Sort token-slots by expert (stable, so earlier tokens win capacity, as in Switch).

    ``capacity`` is one limit for every expert or a [E] tensor of limits: under expert
    parallelism the slots that earlier ranks sent to an expert use up part of its capacity.
    """
    T, K = experts_TK.shape
    N, E, device = T * K, num_experts, experts_TK.device
    experts_N = experts_TK.reshape(-1)
    sorted_experts_N, order_N = torch.sort(experts_N, stable=True)
    bounds_Ep1 = torch.searchsorted(sorted_experts_N, torch.arange(E + 1, device=device))
    routed_E = bounds_Ep1.diff()
    pos_N = torch.arange(N, device=device) - bounds_Ep1[sorted_experts_N]
    kept_E = routed_E if capacity is None else routed_E.clamp(max=capacity)
    group_rows_E = (kept_E + align - 1) // align * align
    ends_E = group_rows_E.cumsum(0)
    row_sorted_N = (ends_E - group_rows_E)[sorted_experts_N] + pos_N

    keep_N = None
    dropped = torch.zeros((), dtype=torch.long, device=device)
    if capacity is None and align == 1:
        num_rows = N
    elif align == 1:
        num_rows = int(ends_E[-1])
    else:
        num_rows = N + E * (align - 1)
    if capacity is not None:
        limit = capacity if isinstance(capacity, int) else capacity[sorted_experts_N]
        keep_sorted_N = pos_N < limit
        dropped = N - keep_sorted_N.sum()
        row_sorted_N = torch.where(keep_sorted_N, row_sorted_N, num_rows)
        keep_N = torch.empty_like(keep_sorted_N).index_copy_(0, order_N, keep_sorted_N)

    # Dropped slots all land on the extra row num_rows, which is cut off.
    slot_of_row_Pp1 = torch.full((num_rows + 1,), N, dtype=torch.long, device=device)
    slot_of_row_P = slot_of_row_Pp1.index_copy_(0, row_sorted_N, order_N)[:num_rows]
    slot_row_N = torch.empty_like(order_N).index_copy_(0, order_N, row_sorted_N)
    if keep_N is not None:
        slot_row_N = torch.where(keep_N, slot_row_N, 0)
    return DispatchPlan(
        slot_of_row_P=slot_of_row_P,
        src_row_P=slot_of_row_P // K,
        slot_row_N=slot_row_N,
        group_rows_E=group_rows_E,
        offsets_E=ends_E.to(torch.int32),
        routed_E=routed_E,
        keep_N=keep_N,
        dropped=dropped,
    )
