"""Named model shapes. Sizes are what `ModelConfig.num_params()` reports (tests check them)."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Runs a training step on CPU in well under a second (cf. torchtitan's `debugmodel`).
    "debug": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        num_experts=4,
        top_k=2,
        rope_theta=10000.0,
        max_seq_len=256,
    ),
    # The `make demo` model: a few minutes of training on 2 CPU cores, 8k vocab, seq 256.
    "tiny": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=512,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        num_experts=8,
        top_k=2,
        rope_theta=10000.0,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
    # A real single-GPU run: Mixtral's shape scaled down to ~1B total / ~0.3B active.
    "small": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2304,
        num_layers=16,
        num_heads=16,
        num_kv_heads=4,
        num_experts=8,
        top_k=2,
        max_seq_len=4096,
    ),
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
    # (46.7B total / 12.9B active, https://mistral.ai/news/mixtral-of-experts).
    "mixtral-8x7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        num_experts=8,
        top_k=2,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_seq_len=32768,
        sliding_window=None,
    ),
}
