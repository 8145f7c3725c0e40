"""Typed config of training (section ``train`` of the config tree).

Batch sizes: ``micro_batch_size`` is sequences per worker per forward pass;
``global_batch_tokens`` is what one optimizer step sees across all workers.
Gradient accumulation is derived from the two (and the dataset's seq_len), so
the same config gives the same optimisation on 1 or 8 workers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from jobs.settings import ConfigError
from pipeline.config_base import Section

DEFAULT_PROMPTS = ["The", "def main(", "In this tutorial, we"]


class TrainConfig(Section):
    max_steps: int = Field(200, gt=0, description="Optimizer steps in total (resumes count on).")
    seed: int = Field(0, description="Seeds the weights, the data order and per-step RNG.")
    init_from: str | None = Field(
        None,
        description="Start from these weights (not optimizer or data position): a checkpoint "
        "URI, or 'champion' = the registered champion's checkpoint (resolved by `run`).",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one GPU each with use_gpu).")
    use_gpu: bool | None = Field(None, description="None = use GPUs when the cluster has them.")

    micro_batch_size: int = Field(8, gt=0, description="Sequences per worker per forward pass.")
    global_batch_tokens: int | None = Field(
        None, gt=0, description="Tokens per optimizer step; default micro_batch * seq * workers."
    )

    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr of the cosine, as a ratio.")
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")

    log_every: int = Field(10, gt=0, description="Steps between metric logs.")
    eval_every: int = Field(50, gt=0, description="Steps between validation passes.")
    eval_batches: int = Field(4, gt=0, description="Micro batches per worker per validation.")
    checkpoint_every: int = Field(100, gt=0, description="Steps between checkpoints.")
    keep_last_k: int = Field(3, gt=0, description="Checkpoints kept in storage.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts allowed; -1 = forever.")

    strategy: Literal["ddp", "fsdp"] = "ddp"
    expert_parallel_size: int = Field(
        1,
        ge=1,
        description="Workers that split each layer's experts among them (all-to-all dispatch); "
        "must divide model.num_experts and train.num_workers.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 compute (fp32 master weights) on GPU, fp32 on CPU."
    )
    activation_checkpointing: bool = False
    compile: bool = False

    shuffle_window_shards: int = Field(
        8, gt=0, description="Shards shuffled together; bounds the rows held in memory."
    )
    prefetch_batches: int = Field(4, gt=0, description="Micro batches loaded ahead per worker.")

    max_consecutive_skips: int = Field(
        5, gt=0, description="Non-finite steps in a row before the run stops."
    )
    dead_expert_warn_steps: int = Field(
        100, gt=0, description="Steps with no tokens before an expert is reported dead."
    )
    sample_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sample_max_new_tokens: int = Field(32, ge=0)

    inject_nan_steps: list[int] = Field(
        default_factory=list, description="Testing hook: poison the loss at these steps."
    )
    inject_nan_rank: int = Field(0, ge=0, description="Testing hook: the rank that is poisoned.")
    inject_kill_step: int | None = Field(
        None, gt=0, description="Testing hook: SIGKILL a worker once, at this step."
    )
    inject_kill_rank: int = Field(0, ge=0, description="Testing hook: the rank that is killed.")

    def grad_accum(self, seq_len: int, world_size: int) -> int:
        """Micro steps per optimizer step so that one step sees ``global_batch_tokens``."""
        per_micro = self.micro_batch_size * seq_len * world_size
        if self.global_batch_tokens is None:
            return 1
        if self.global_batch_tokens % per_micro:
            raise ConfigError(
                f"train.global_batch_tokens: must be a multiple of micro_batch_size * seq_len * "
                f"num_workers ({per_micro}), got {self.global_batch_tokens}"
            )
        return self.global_batch_tokens // per_micro

    def check_expert_parallel(self, num_experts: int, world_size: int) -> None:
        """Each EP group of ``expert_parallel_size`` workers owns whole experts of every layer."""
        ep = self.expert_parallel_size
        if num_experts % ep or world_size % ep:
            raise ConfigError(
                f"train.expert_parallel_size: must divide model.num_experts ({num_experts}) and "
                f"train.num_workers ({world_size}), got {ep}"
            )
        if ep > 1 and self.compile:
            raise ConfigError(
                "train.compile: not supported with train.expert_parallel_size > 1 "
                f"(got {ep}); the all-to-all dispatch runs eagerly"
            )

    def global_batch_size(self, seq_len: int, world_size: int) -> int:
        """Sequences per optimizer step across all workers."""
        return self.micro_batch_size * world_size * self.grad_accum(seq_len, world_size)
