"""Dense building blocks, numerically identical to Hugging Face Mixtral: RMSNorm, RoPE, attention.

Tensor names carry their shapes (the legend: moe_model/config.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_model.config import ModelConfig
from moe_model.cpu import functions as cpu


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), statistics in fp32 as HF's MixtralRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        dtype = x_BTD.dtype
        if dtype == torch.float32 and cpu.eager_cpu(x_BTD) and cpu.HAS_FUSED_RMS_NORM:
            return cpu.RMSNormCPU.apply(x_BTD, self.weight, self.eps)
        if dtype == torch.float32:
            # One fused kernel instead of six; same math when nothing needs casting.
            return F.rms_norm(x_BTD, self.weight.shape, self.weight, self.eps)
        x32_BTD = x_BTD.float()
        x32_BTD = x32_BTD * torch.rsqrt(x32_BTD.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32_BTD.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (Su et al. 2021) with cos/sin tables precomputed for max_seq_len."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos_TDh", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin_TDh", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Fill the tables (again after `to_empty()` from the meta device)."""
        device = self.cos_TDh.device
        # Same expression as transformers' default rope init, so fp32 tables match bit for bit.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        pos_T = torch.arange(self.max_seq_len, device=device).float()
        freqs_TDh = torch.outer(pos_T, inv_freq).repeat(1, 2)
        self.cos_TDh.copy_(freqs_TDh.cos())
        self.sin_TDh.copy_(freqs_TDh.sin())

    def forward(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        if start + length > self.max_seq_len:
            raise ValueError(
                f"max_seq_len: sequence of {start + length} positions exceeds {self.max_seq_len}"
            )
        cos_TDh = self.cos_TDh[start : start + length].to(dtype)
        sin_TDh = self.sin_TDh[start : start + length].to(dtype)
        return cos_TDh, sin_TDh


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over the last dim (Dh); cos/sin broadcast to x."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated per-layer keys/values for incremental decoding."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, like: torch.Tensor):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k_BHkvSDh = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v_BHkvSDh = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.length = 0

    def append(self, k_BHkvTDh: torch.Tensor, v_BHkvTDh: torch.Tensor) -> tuple[torch.Tensor, ...]:
        end = self.length + k_BHkvTDh.shape[2]
        self.k_BHkvSDh[:, :, self.length : end] = k_BHkvTDh
        self.v_BHkvSDh[:, :, self.length : end] = v_BHkvTDh
        self.length = end
        return self.k_BHkvSDh[:, :, :end], self.v_BHkvSDh[:, :, :end]


def attention_mask(
    start: int, q_len: int, k_len: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean [T, S] mask: causal, and within the sliding window when set.

    The window keeps the `window` most recent positions including the query's own,
    as transformers' `sliding_window_overlay` does (kv_idx > q_idx - window).
    """
    q_T1 = torch.arange(start, start + q_len, device=device).unsqueeze(1)
    k_1S = torch.arange(k_len, device=device).unsqueeze(0)
    keep_TS = k_1S <= q_T1
    if window is not None:
        keep_TS &= k_1S > q_T1 - window
    return keep_TS


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023) through F.scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, dh = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, dh
        self.sliding_window = cfg.sliding_window
        self.q_proj = nn.Linear(d, cfg.num_heads * dh, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * dh, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * dh, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * dh, d, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: RotaryEmbedding,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        start = cache.length if cache is not None else 0
        # One GEMM for q, k and v (the weights stay separate, as in HF, for conversion).
        w_qkv = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        qkv_BTHqkvDh = F.linear(x_BTD, w_qkv).view(B, T, H + 2 * Hkv, self.head_dim)
        cos_TDh, sin_TDh = rope(start, T, x_BTD.dtype)
        if cpu.eager_cpu(qkv_BTHqkvDh):
            q_BHTDh, k_BHkvTDh, v_BHkvTDh = cpu.SplitRopeCPU.apply(
                qkv_BTHqkvDh, cos_TDh, sin_TDh, H
            )
        else:  # on a GPU torch.compile fuses these; eager it is a few small kernels
            qk_BTHqkDh = apply_rope(
                qkv_BTHqkvDh[:, :, : H + Hkv], cos_TDh[:, None], sin_TDh[:, None]
            )
            q_BHTDh = qk_BTHqkDh[:, :, :H].transpose(1, 2)
            k_BHkvTDh = qk_BTHqkDh[:, :, H:].transpose(1, 2)
            v_BHkvTDh = qkv_BTHqkvDh[:, :, H + Hkv :].transpose(1, 2)
        if cache is not None:  # the keys and values of every position so far
            k_BHkvSDh, v_BHkvSDh = cache.append(k_BHkvTDh, v_BHkvTDh)
        else:
            k_BHkvSDh, v_BHkvSDh = k_BHkvTDh, v_BHkvTDh
        o_BHTDh = self._sdpa(q_BHTDh, k_BHkvSDh, v_BHkvSDh, start)
        return self.o_proj(o_BHTDh.transpose(1, 2).reshape(B, T, -1))

    def _sdpa(
        self, q_BHTDh: torch.Tensor, k_BHkvSDh: torch.Tensor, v_BHkvSDh: torch.Tensor, start: int
    ) -> torch.Tensor:
        T, S = q_BHTDh.shape[2], k_BHkvSDh.shape[2]
        gqa = self.num_heads != self.num_kv_heads
        window_bites = self.sliding_window is not None and self.sliding_window < S
        if start == 0 and T == S and not window_bites:
            return F.scaled_dot_product_attention(
                q_BHTDh, k_BHkvSDh, v_BHkvSDh, is_causal=True, enable_gqa=gqa
            )
        mask_TS = attention_mask(start, T, S, self.sliding_window, q_BHTDh.device)
        if gqa and q_BHTDh.is_cuda:
            # CUDA's fused kernels take GQA only without a mask; else SDPA falls back to math.
            groups = self.num_heads // self.num_kv_heads
            k_BHSDh = k_BHkvSDh.repeat_interleave(groups, dim=1)
            v_BHSDh = v_BHkvSDh.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q_BHTDh, k_BHSDh, v_BHSDh, attn_mask=mask_TS)
        return F.scaled_dot_product_attention(
            q_BHTDh, k_BHkvSDh, v_BHkvSDh, attn_mask=mask_TS, enable_gqa=gqa
        )
