"""AdamW with weight decay only on matrices that are not embeddings.

Decaying norm gains, biases and embedding rows pulls them towards zero for no
regularisation benefit (GPT-2/nanoGPT ``configure_optimizers``; OLMo excludes
embeddings too, arXiv:2402.00838 sec. 3.2). Parameters are grouped by name so
that the rule survives DDP/FSDP wrapping.
"""

from __future__ import annotations

import torch
from torch import nn

from jobs.train.config import TrainConfig

_NO_DECAY_NAMES = ("embed", "norm", "bias", "router_bias")


def decays(name: str, param: torch.Tensor) -> bool:
    """True for weight matrices that get weight decay."""
    lowered = name.lower()
    return param.ndim >= 2 and not any(word in lowered for word in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, fused: bool = True, mixed: bool = False
) -> torch.optim.AdamW:
    """Fused AdamW (one kernel per parameter, no temporaries) unless ``fused=False``: on the
    `tiny` model's CPU step it took 8.8 ms against 55 ms for the default per-tensor loop,
    which also page-faulted ~24k fresh temporaries in every step.

    ``mixed``: FSDP's DTensors share groups with plain tensors (expert-parallel shards), which
    the fused and foreach kernels refuse; the per-tensor loop takes them."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=(fused and not mixed) or None,
        foreach=False if mixed else None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
