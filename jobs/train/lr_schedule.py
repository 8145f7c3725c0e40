"""Learning rate: linear warmup, then cosine decay to ``min_lr_ratio * lr``.

The cosine schedule follows Loshchilov & Hutter (SGDR, arXiv:1608.03983)
without restarts, as in GPT-3 / Chinchilla; the lr is a pure function of the
step so that a resumed run continues on the same curve.
"""

from __future__ import annotations

import math

from jobs.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    warmup = min(cfg.warmup_steps, cfg.max_steps - 1)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
