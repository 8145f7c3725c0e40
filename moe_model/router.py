"""Top-k softmax router and its losses.

Tensor names carry their shapes (the legend: moe_model/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_model.config import ModelConfig


@dataclass
class Routing:
    logits_TE: torch.Tensor  # fp32
    probs_TE: torch.Tensor  # fp32 softmax over all experts
    experts_TK: torch.Tensor  # int64 selected expert ids
    weights_TK: torch.Tensor  # fp32 selected probabilities renormalised to sum to 1


class Router(nn.Module):
    """Bias-free linear gate, computed in fp32: softmax -> top-k -> renormalise (HF Mixtral).

    With `router_bias_update_rate > 0` a per-expert bias is added to the probabilities for the
    top-k *selection only*; the mixing weights stay the unbiased probabilities
    (auxiliary-loss-free balancing, DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.bias_update_rate = cfg.router_bias_update_rate
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("selection_bias_E", torch.zeros(cfg.num_experts))
        # Token-slots routed to each expert since the last bias update, summed over micro-batches.
        self.register_buffer("pending_counts_E", torch.zeros(cfg.num_experts), persistent=False)

    @property
    def balancing(self) -> bool:
        return self.bias_update_rate > 0

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        if self.balancing:
            _, experts_TK = torch.topk(probs_TE + self.selection_bias_E, self.top_k, dim=-1)
            weights_TK = probs_TE.gather(1, experts_TK)
        else:
            weights_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return Routing(logits_TE, probs_TE, experts_TK, weights_TK)

    @torch.no_grad()
    def record_counts(self, routed_E: torch.Tensor) -> None:
        if self.balancing and self.training:
            self.pending_counts_E += routed_E

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias_e += rate * sign(mean load - load_e), then forget the counts (DeepSeek-V3 eq. 16)."""
        if not self.balancing:
            return
        counts_E = self.pending_counts_E
        self.selection_bias_E += self.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        counts_E.zero_()


def load_balancing_loss(probs_TE: torch.Tensor, routed_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e.

    f_e is the fraction of the T*K token-slots sent to expert e (no gradient), P_e the mean
    router probability of e (carries the gradient). Normalising f by T*K instead of T makes the
    perfectly balanced value 1 for any top_k.
    """
    T, E = probs_TE.shape
    f_E = routed_E.to(probs_TE.dtype) / (T * top_k)
    return E * torch.sum(f_E * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
