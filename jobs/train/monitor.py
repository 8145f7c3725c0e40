"""Per-interval training metrics and the dead-expert watch.

Scalars are averaged over the steps of a log interval that were not skipped;
per-layer MoE numbers are keyed by ``moe_model.routing_stats.metric_key``
(``moe/layer_XX/...``). Per-expert counts are
returned separately for the routing artifacts, never as metric keys.
"""

from __future__ import annotations

import logging

import numpy as np

from jobs.train.step import StepResult
from moe_model.routing_stats import metric_key

log = logging.getLogger("jobs.train")


class IntervalStats:
    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.shape = (num_layers, num_experts)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sums = np.zeros(5)
        self.tokens_le = np.zeros(self.shape)
        self.imbalance_l = np.zeros(self.shape[0])
        self.entropy_l = np.zeros(self.shape[0])

    def add(self, r: StepResult) -> None:
        if r.skipped:
            return
        self.n += 1
        self.sums += [r.loss, r.ce_loss, r.aux_loss, r.z_loss, r.grad_norm]
        self.tokens_le += r.tokens_le
        self.imbalance_l += r.load_imbalance_l
        self.entropy_l += r.entropy_l

    def metrics(self) -> dict[str, float]:
        if self.n == 0:
            return {}
        loss, ce, aux, z, grad_norm = self.sums / self.n
        out = {
            "train/loss": loss,
            "train/ce_loss": ce,
            "train/aux_loss": aux,
            "train/z_loss": z,
            "train/grad_norm": grad_norm,
        }
        dead_l = (self.tokens_le == 0).sum(axis=1)
        for layer in range(self.shape[0]):
            out[metric_key("load_imbalance", layer)] = self.imbalance_l[layer] / self.n
            out[metric_key("entropy", layer)] = self.entropy_l[layer] / self.n
            out[metric_key("dead_experts", layer)] = float(dead_l[layer])
        return out


class DeadExpertWatch:
    """Warns once when an expert has received no token for ``patience`` steps in a row."""

    def __init__(self, num_layers: int, num_experts: int, patience: int, idle: list[int]) -> None:
        self.patience = patience
        shape = (num_layers, num_experts)
        self.idle = np.array(idle, dtype=np.int64).reshape(shape) if idle else np.zeros(shape, int)

    def update(self, tokens_le: np.ndarray, step: int) -> list[tuple[int, int]]:
        self.idle = np.where(tokens_le > 0, 0, self.idle + 1)
        layers, experts = np.nonzero(self.idle == self.patience)
        newly = [(int(a), int(b)) for a, b in zip(layers, experts, strict=True)]
        for layer, expert in newly:
            log.warning(
                "step %d: expert %d of layer %d received no tokens for %d steps",
                step,
                expert,
                layer,
                self.patience,
            )
        return newly

    def state(self) -> list[int]:
        return self.idle.flatten().tolist()
