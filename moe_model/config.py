"""Model configuration: one dataclass, validated on construction, that reports its own size.

The shape legend of every tensor name in moe_model/ (``x_BTD`` is [B, T, D]):
    B batch, T tokens (a sequence's positions; B*T once flattened, as in the MoE layer
    and the loss), S key positions in attention (KV cache + new; T the new queries),
    D hidden, Dh head dim, H query heads, Hkv key/value heads, Hqk = H + Hkv (the heads
    RoPE rotates), Hqkv = H + 2*Hkv (the fused q/k/v projection's heads), V vocab,
    L layers, E experts, K top_k, F expert hidden, N token-slots (T*K), P rows of the
    expert-sorted buffer (one per kept token-slot, plus alignment padding), M a layer's
    routing statistics (``RoutingStats.scalars``), G rows per GEMM block of the fused loss,
    R rows of one block (G, fewer in the last), C rows per softmax chunk in a block.
A digit before a letter multiplies it (2F: gate and up halves); a 1 is an axis of size 1
(rstd_BT1 is [B, T, 1]); p1 adds one entry (x_Tp1D: a zero row appended for padding rows to
read; bounds_Ep1: E + 1 group bounds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# RoPE tables are precomputed for every position (layers.RotaryEmbedding), so a hostile
# ``max_position_embeddings`` of 10^9 would allocate gigabytes; 2^20 is past any released
# Mixtral-style model's context.
MAX_SEQ_LEN = 1 << 20


class ModelConfigError(ValueError):
    """A bad ``ModelConfig`` value: ``field`` is the field (or ``preset``), ``problem`` what is
    wrong with it. The message is ``"field: problem"``; ``jobs`` reports it as ``model.field``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    num_experts: int = 8
    top_k: int = 2
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 4096
    sliding_window: int | None = None
    tie_embeddings: bool = False
    # Switch Transformer load-balancing loss weight (Fedus et al. 2021, eq. 4).
    aux_loss_coef: float = 0.01
    # ST-MoE router z-loss weight (Zoph et al. 2022, eq. 5); the paper uses 1e-3.
    z_loss_coef: float = 1e-3
    # None = dropless; otherwise each expert takes at most ceil(cf * N / E) token-slots.
    capacity_factor: float | None = None
    init_std: float = 0.02
    # Auxiliary-loss-free balancing step size (DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2); 0 = off.
    router_bias_update_rate: float = 0.0

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        from moe_model.presets import PRESETS

        if name not in PRESETS:
            raise ModelConfigError(
                "preset", f"unknown name {name!r}, expected one of {sorted(PRESETS)}"
            )
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelConfigError(unknown[0], "not a ModelConfig field")
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def dense_equivalent(self) -> ModelConfig:
        """The dense model with this one's active parameters and FLOPs per token: one expert of
        hidden size top_k * F that every token takes with weight 1 (the FLOP-matched dense
        baseline of the Switch Transformer comparisons, Fedus et al. 2021). Only the router's
        (E - 1) * D weights per layer differ, which a test holds under 1%."""
        return self.replace(
            num_experts=1,
            top_k=1,
            intermediate_size=self.top_k * self.intermediate_size,
            capacity_factor=None,
            router_bias_update_rate=0.0,
        )

    # Parameter accounting (OLMo-core MoEConfig.num_params style); tests hold these to numel().

    def _attention_params(self) -> int:
        d, dh = self.hidden_size, self.head_dim
        return d * self.num_heads * dh * 2 + d * self.num_kv_heads * dh * 2

    def _expert_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def _embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def _layer_params(self, experts: int) -> int:
        router = self.num_experts * self.hidden_size
        norms = 2 * self.hidden_size
        return self._attention_params() + router + norms + experts * self._expert_params()

    def num_params(self) -> int:
        layers = self.num_layers * self._layer_params(self.num_experts)
        return self._embedding_params() + layers + self.hidden_size

    def num_active_params(self) -> int:
        """Parameters touched by one token: all but the (E - K) unselected experts per layer."""
        layers = self.num_layers * self._layer_params(self.top_k)
        return self._embedding_params() + layers + self.hidden_size

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token, torchtitan's formula.

        6 * active non-embedding parameters (the input embedding is a lookup, the output
        projection a matmul) plus 12 * L * H * Dh * T for attention scores and values
        (PaLM, Chowdhery et al. 2022, appendix B), counting the full square as torchtitan does.
        """
        matmul_params = self.num_active_params() - self.vocab_size * self.hidden_size
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.hidden_size
        context = min(seq_len, self.sliding_window) if self.sliding_window else seq_len
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * context
        return 6.0 * matmul_params + attention


def _validate(c: ModelConfig) -> None:
    positive_ints = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "num_experts",
        "top_k",
        "max_seq_len",
    )
    for name in positive_ints:
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelConfigError(name, f"must be a positive integer, got {value!r}")
    if c.max_seq_len > MAX_SEQ_LEN:
        raise ModelConfigError("max_seq_len", f"must be at most {MAX_SEQ_LEN}, got {c.max_seq_len}")
    if c.hidden_size % c.num_heads:
        raise ModelConfigError(
            "hidden_size", f"must be divisible by num_heads ({c.num_heads}), got {c.hidden_size}"
        )
    if c.head_dim % 2:
        raise ModelConfigError("hidden_size", f"head_dim must be even for RoPE, got {c.head_dim}")
    if c.num_kv_heads > c.num_heads or c.num_heads % c.num_kv_heads:
        raise ModelConfigError(
            "num_kv_heads", f"must divide num_heads ({c.num_heads}), got {c.num_kv_heads}"
        )
    if c.top_k > c.num_experts:
        raise ModelConfigError("top_k", f"must be <= num_experts ({c.num_experts}), got {c.top_k}")
    if c.sliding_window is not None and (
        isinstance(c.sliding_window, bool)
        or not isinstance(c.sliding_window, int)
        or c.sliding_window < 1
    ):
        raise ModelConfigError(
            "sliding_window", f"must be a positive integer or None, got {c.sliding_window!r}"
        )
    if not isinstance(c.tie_embeddings, bool):
        raise ModelConfigError("tie_embeddings", f"must be a bool, got {c.tie_embeddings!r}")
    _check_float(c, "rope_theta", low=0.0, strict=True)
    _check_float(c, "rms_norm_eps", low=0.0, strict=True)
    _check_float(c, "init_std", low=0.0, strict=True)
    _check_float(c, "aux_loss_coef", low=0.0, strict=False)
    _check_float(c, "z_loss_coef", low=0.0, strict=False)
    _check_float(c, "router_bias_update_rate", low=0.0, strict=False)
    if c.capacity_factor is not None:
        _check_float(c, "capacity_factor", low=0.0, strict=True)


def _check_float(c: ModelConfig, name: str, low: float, strict: bool) -> None:
    value = getattr(c, name)
    bad_type = isinstance(value, bool) or not isinstance(value, int | float)
    if bad_type or value != value or value < low or (strict and value == low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ModelConfigError(name, f"must be a number {bound}, got {value!r}")
