"""Mixtral-style decoder: embedding, L x (attention + sparse MoE) pre-norm blocks, LM head.

Tensor names carry their shapes (the legend: moe_model/config.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moe_model.config import ModelConfig
from moe_model.layers import Attention, KVCache, RMSNorm, RotaryEmbedding
from moe_model.loss import head_and_loss, head_loss, total_loss
from moe_model.moe import MoE
from moe_model.routing_stats import RoutingStats


@dataclass
class MoEOutput:
    logits: torch.Tensor | None  # [B, T, V]; None with `targets` (never materialised whole)
    loss: torch.Tensor | None  # `loss.total_loss`, when labels or targets are given
    ce_loss: torch.Tensor | None
    aux_loss: torch.Tensor  # Switch load-balancing loss, mean over layers
    z_loss: torch.Tensor  # router z-loss, mean over layers
    routing: list[RoutingStats]  # one per layer, detached


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.moe_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = MoE(cfg)

    def forward(
        self, x_BTD: torch.Tensor, rope: RotaryEmbedding, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, RoutingStats, torch.Tensor, torch.Tensor]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), rope, cache)
        y_BTD, stats, aux, z = self.moe(self.moe_norm(x_BTD))
        return x_BTD + y_BTD, stats, aux, z


class MoETransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) everywhere; residual-output projections (attention o_proj, expert w2)
        scaled by 1/sqrt(2L) (GPT-2, Radford et al. 2019) so the residual stream's variance does
        not grow with depth. Draws from torch's global RNG in a fixed order: seed, then build."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.layers:
            attn, moe = block.attn, block.moe
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.normal_(proj.weight, std=std)
            nn.init.normal_(attn.o_proj.weight, std=out_std)
            nn.init.normal_(moe.router.weight, std=std)
            nn.init.normal_(moe.w13, std=std)
            nn.init.normal_(moe.w2, std=out_std)
            moe.router.selection_bias_E.zero_()
            moe.router.pending_counts_E.zero_()
            nn.init.ones_(block.attn_norm.weight)
            nn.init.ones_(block.moe_norm.weight)
        nn.init.ones_(self.norm.weight)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        self.rope.reset_tables()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> MoEOutput:
        """`targets` [B, T] are aligned with `input_ids` (position t predicts targets[t]; for
        rows of seq_len + 1 tokens: `model(row[:, :-1], targets=row[:, 1:])`), the training
        path: the LM head runs fused with the loss and no logits are returned. `labels` follow
        HF (position t predicts labels[t + 1]) and the logits are returned. -100 is ignored."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids: expected shape [batch, seq], got {tuple(input_ids.shape)}"
            )
        if labels is not None and targets is not None:
            raise ValueError("targets: pass either labels (HF-shifted) or targets, not both")
        for name, t in (("labels", labels), ("targets", targets)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(
                    f"{name}: expected shape {tuple(input_ids.shape)} (as input_ids), "
                    f"got {tuple(t.shape)}"
                )
        x_BTD = self.embed(input_ids)
        routing, aux_losses, z_losses = [], [], []
        for i, block in enumerate(self.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            x_BTD, stats, aux, z = block(x_BTD, self.rope, cache)
            routing.append(stats)
            aux_losses.append(aux)
            z_losses.append(z)
        h_BTD = self.norm(x_BTD)
        logits_BTV, ce_loss = None, None
        if targets is not None:
            ce_loss = head_loss(h_BTD, self.lm_head.weight, targets)
        elif labels is not None:
            logits_BTV, ce_loss = head_and_loss(h_BTD, self.lm_head.weight, labels)
        else:
            logits_BTV = self.lm_head(h_BTD)
        aux_loss = torch.stack(aux_losses).mean()
        z_loss = torch.stack(z_losses).mean()
        loss = None
        if ce_loss is not None:
            cfg = self.config
            loss = total_loss(ce_loss, aux_loss, z_loss, cfg.aux_loss_coef, cfg.z_loss_coef)
        return MoEOutput(logits_BTV, loss, ce_loss, aux_loss, z_loss, routing)

    def new_kv_caches(self, batch: int, max_len: int) -> list[KVCache]:
        cfg, like = self.config, self.embed.weight
        return [
            KVCache(batch, cfg.num_kv_heads, max_len, cfg.head_dim, like)
            for _ in range(cfg.num_layers)
        ]

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        from moe_model.generate import generate

        return generate(
            self, input_ids, max_new_tokens, temperature, top_p, eos_token_id, generator
        )

    @torch.no_grad()
    def update_router_biases(
        self, all_reduce: Callable[[torch.Tensor], None] | None = None
    ) -> None:
        """Apply aux-loss-free bias updates from the counts seen since the last call.

        Call after each optimizer step. Under data parallelism pass an in-place sum across
        ranks (e.g. `torch.distributed.all_reduce`) so every rank applies the same update.
        """
        routers = [block.moe.router for block in self.layers]
        if not routers or not routers[0].balancing:
            return
        if all_reduce is not None:
            counts_LE = torch.stack([r.pending_counts_E for r in routers])
            all_reduce(counts_LE)
            for r, counts_E in zip(routers, counts_LE, strict=True):
                r.pending_counts_E.copy_(counts_E)
        for r in routers:
            r.update_bias()

    def set_experts_backend(self, backend: str) -> None:
        """ "auto" (grouped GEMM where supported, else a loop over experts), "loop", "grouped_mm"."""
        from moe_model.moe import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        for block in self.layers:
            block.moe.backend = backend
