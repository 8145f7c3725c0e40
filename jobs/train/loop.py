"""The per-worker training loop. Plain Python: Ray calls it, and so does the benchmark.

Everything a resumed run needs comes from the checkpoint (weights, optimizer,
``TrainerState``) or is a pure function of (seed, step, rank): data order
(``Sampler``), learning rate (``lr_at``) and the per-step RNG seed. That is
why a run killed at any point continues with bit-identical losses on CPU.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jobs.config import RootConfig
from jobs.errors import JobError
from jobs.tracking import NullTracker
from jobs.tracking.artifacts import RoutingArtifacts
from jobs.train.checkpoint import (
    TrainerState,
    check_resume,
    load_model_weights,
    load_training_checkpoint,
    model_config_hash,
    read_state,
    remove_dir,
    save_checkpoint,
)
from jobs.train.data import TrainBatches, val_batches, val_batches_by_source
from jobs.train.distributed import all_reduce_sum, parallelize, uses_fsdp
from jobs.train.env import WorkerEnv
from jobs.train.expert_parallel import apply_expert_parallel
from jobs.train.generations import generate_samples
from jobs.train.init_from import confine_checkpoint
from jobs.train.lr_schedule import lr_at
from jobs.train.mixture_sampler import MixtureSampler, train_sampler
from jobs.train.monitor import DeadExpertWatch, IntervalStats
from jobs.train.optim import build_optimizer
from jobs.train.perf import Meter, peak_flops
from jobs.train.step import Trainee, held_out_loss, perplexity, train_step
from jobs.train.upcycling import load_upcycled_weights, upcycle_source
from moe_model import ModelConfig, MoETransformer
from moe_model.cpu import scratch

log = logging.getLogger("jobs.train")


@dataclass
class Setup:
    root: RootConfig
    reader: Any
    model_cfg: ModelConfig
    trainee: Trainee
    state: TrainerState
    accum: int
    global_batch: int


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63)


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def build(
    root: RootConfig, dataset_uri: str, env: WorkerEnv, init_from: str | None = None
) -> Setup:
    from pipeline.reader import DatasetReader

    cfg = root.train
    reader = DatasetReader(dataset_uri)
    model_cfg = root.model.build(reader.vocab_size)
    _check_fits(reader, model_cfg)
    bf16 = use_bf16(cfg.precision, env.device)
    torch.manual_seed(cfg.seed)
    # Built on the device: initialising a billion parameters on the host takes a while.
    # Every rank draws the same weights (same seed, same device type), as FSDP needs.
    with env.device:
        raw = MoETransformer(model_cfg)
    cfg.check_expert_parallel(model_cfg.num_experts, env.world_size)
    ep = None
    if cfg.expert_parallel_size > 1:
        if upcycle_source(init_from) is not None:
            raise JobError("train.expert_parallel_size: upcycling a dense model needs 1")
        # Every rank built all experts from the same seed, so its slice is the EP 1 init.
        ep = apply_expert_parallel(raw, cfg.expert_parallel_size, env.device)
    module = parallelize(
        raw,
        cfg.strategy,
        env.device,
        bf16,
        cfg.activation_checkpointing,
        cfg.compile,
        expert_params=ep.params if ep else None,
    )
    optimizer = build_optimizer(module, cfg, mixed=ep is not None and uses_fsdp(module))
    trainee = Trainee(raw, module, optimizer, env.device, bf16, ep)
    accum = cfg.grad_accum(reader.seq_len, env.world_size)
    global_batch = cfg.global_batch_size(reader.seq_len, env.world_size)
    state = TrainerState(
        dataset_uri=dataset_uri,
        dataset_fingerprint=reader.fingerprint,
        model_config_hash=model_config_hash(model_cfg),
        seed=cfg.seed,
        world_size=env.world_size,
        global_batch_size=global_batch,
    )
    with env.restore_dir() as path:
        if path is not None:
            check_resume(read_state(path), reader.fingerprint, model_cfg, path, seed=cfg.seed)
            state = load_training_checkpoint(path, module, optimizer, ep)
            state.world_size, state.global_batch_size = env.world_size, global_batch
            log.info("resumed from %s at step %d", path, state.step)
        elif upcycle_source(init_from) is not None:
            dense = confine_checkpoint(
                root.storage.root, upcycle_source(init_from), relative_to="root"
            )
            load_upcycled_weights(dense, module, model_cfg, cfg.seed)
        elif init_from:
            uri = confine_checkpoint(root.storage.root, init_from)
            load_model_weights(uri, module, model_cfg, ep)
    return Setup(root, reader, model_cfg, trainee, state, accum, global_batch)


def _check_fits(reader, model_cfg: ModelConfig) -> None:
    train = reader.manifest["splits"]["train"]
    if not train["rows"]:
        quarantine = reader.manifest.get("quarantine", {})
        reasons = ", ".join(f"{k} {v}" for k, v in quarantine.get("by_reason", {}).items())
        raise JobError(
            f"the dataset has no training rows of seq_len + 1 tokens ({train['documents']} "
            f"documents kept, {quarantine.get('total', 0)} quarantined"
            + (f": {reasons}" if reasons else "")
            + "); see its quarantine/ folder, or lower data.seq_len"
        )
    if reader.vocab_size > model_cfg.vocab_size:
        raise JobError(
            f"model.vocab_size: {model_cfg.vocab_size} is smaller than the dataset's "
            f"vocabulary ({reader.vocab_size})"
        )
    if reader.seq_len > model_cfg.max_seq_len:
        raise JobError(
            f"model.max_seq_len: {model_cfg.max_seq_len} is shorter than the dataset's "
            f"seq_len ({reader.seq_len})"
        )


def run(
    root: RootConfig,
    dataset_uri: str,
    env: WorkerEnv,
    tracking=None,
    init_from: str | None = None,
) -> dict[str, Any]:
    """Train until ``train.max_steps``; returns final metrics, or ``aborted`` with a reason."""
    s = build(root, dataset_uri, env, init_from)
    tracker = tracking.create() if (tracking is not None and env.rank == 0) else NullTracker()
    if s.state.step == 0:
        tracker.log_params(root.model_dump(mode="json"))
    tracker.set_tags({"dataset_uri": dataset_uri, "dataset_fingerprint": s.reader.fingerprint})
    status = "FAILED"
    # The CPU scratch pool lives as long as this run (moe_model/cpu/scratch.py).
    try:
        with scratch.scope():
            result = Loop(s, env, tracker).run()
        status = "FAILED" if result.get("aborted") else "FINISHED"
    finally:
        tracker.close(status)
    result["mlflow_run_id"] = getattr(tracker, "run_id", None)
    return result


class Loop:
    def __init__(self, s: Setup, env: WorkerEnv, tracker) -> None:
        self.s, self.env, self.tracker = s, env, tracker
        self.cfg = s.root.train
        mc = s.model_cfg
        self.seq_len = s.reader.seq_len
        self.interval = IntervalStats(mc.num_layers, mc.num_experts)
        self.dead = DeadExpertWatch(
            mc.num_layers,
            mc.num_experts,
            self.cfg.dead_expert_warn_steps,
            s.state.expert_idle_steps,
        )
        peak = peak_flops(env.device, s.trainee.bf16)
        self.meter = Meter(mc.flops_per_token(self.seq_len), peak, env.world_size)
        self.artifact_dir = Path(tempfile.mkdtemp(prefix="moe-train-artifacts-"))
        self.routing = RoutingArtifacts(self.artifact_dir)
        self.routing_since_eval = None
        self.last_checkpoint: str | None = None
        self.final: dict[str, float] = {}

    def run(self) -> dict[str, Any]:
        s, cfg = self.s, self.cfg
        sampler = train_sampler(s.reader, cfg.seed, cfg.shuffle_window_shards)
        if isinstance(sampler, MixtureSampler):
            _check_capacity(sampler, cfg.max_steps * s.global_batch)
            _log_schedule(sampler)
        loader = TrainBatches(
            s.reader,
            sampler,
            self.env.rank,
            self.env.world_size,
            cfg.micro_batch_size,
            s.accum,
            s.state.samples_seen,
            self.env.device,
            cfg.prefetch_batches,
        )
        held_out = (s.reader, self.env.rank, self.env.world_size, cfg.micro_batch_size)
        self.val_by_source = val_batches_by_source(*held_out, cfg.eval_batches)
        # A mixture's val/loss is over every source's set alike, not the first source's rows.
        self.val = [b for bs in self.val_by_source.values() for b in bs] or val_batches(
            *held_out, cfg.eval_batches
        )
        try:
            for step in range(s.state.step + 1, cfg.max_steps + 1):
                aborted = self.one_step(step, loader)
                if aborted:
                    return {"aborted": aborted, "steps": s.state.step}
        finally:
            loader.close()
        if "val/loss" not in self.final and self.val:
            # Nothing left to train (a finished run started again): still report the model.
            self.final.update(self.validate())
        self.final["check/param_rank_spread"] = self.param_rank_spread()
        if self.last_checkpoint:
            self.tracker.set_tags({"checkpoint_uri": self.last_checkpoint})
        return {
            "metrics": {k: float(v) for k, v in self.final.items()},
            "steps": s.state.step,
            "checkpoint": self.last_checkpoint,
            "skipped_steps": s.state.skipped_steps,
        }

    def one_step(self, step: int, loader: TrainBatches) -> str | None:
        cfg, state, env = self.cfg, self.s.state, self.env
        torch.manual_seed(step_seed(cfg.seed, step, env.rank))
        start = time.perf_counter()
        batches, wait = loader.next_step()
        poison = step in cfg.inject_nan_steps and env.rank == cfg.inject_nan_rank
        result = train_step(self.s.trainee, batches, lr_at(step - 1, cfg), cfg.grad_clip, poison)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        self.meter.add(self.s.global_batch * self.seq_len, time.perf_counter() - start, wait)
        state.step = step
        state.samples_seen += self.s.global_batch
        state.tokens_seen += self.s.global_batch * self.seq_len
        self.interval.add(result)
        if result.skipped:
            state.skipped_steps += 1
            state.consecutive_skips += 1
            log.warning("step %d: non-finite loss or gradient norm, step skipped", step)
            if state.consecutive_skips >= cfg.max_consecutive_skips:
                return (
                    f"{state.consecutive_skips} consecutive non-finite steps (last at step "
                    f"{step}); last good checkpoint: {self.last_checkpoint or 'none saved yet'}"
                )
        else:
            state.consecutive_skips = 0
            self.dead.update(result.tokens_le, step)
            state.expert_idle_steps = self.dead.state()
            self.routing_since_eval = (
                result.tokens_le
                if self.routing_since_eval is None
                else self.routing_since_eval + result.tokens_le
            )
        self.after_step(step)
        return None

    def after_step(self, step: int) -> None:
        cfg = self.cfg
        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or last:
            self.log_metrics(step)
        if step % cfg.eval_every == 0 or last:
            self.eval_and_samples(step)
        kill = cfg.inject_kill_step == step and self.env.rank == cfg.inject_kill_rank
        if kill and self.env.should_kill(step):
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if step % cfg.checkpoint_every == 0 or last:
            self.checkpoint(step)

    def log_metrics(self, step: int) -> None:
        state = self.s.state
        metrics = {
            **self.interval.metrics(),
            **self.meter.metrics(),
            "train/lr": lr_at(step - 1, self.cfg),
            "train/skipped_steps": float(state.skipped_steps),
            "train/tokens_seen": float(state.tokens_seen),
        }
        self.interval.reset()
        self.meter.reset()
        self.tracker.log(metrics, step)
        self.final.update(metrics)
        self.env.progress(
            {
                "step": step,
                "max_steps": self.cfg.max_steps,
                "loss": metrics.get("train/loss", math.nan),
                "tokens_per_s": metrics.get("perf/tokens_per_s", math.nan),
            }
        )

    def eval_and_samples(self, step: int) -> None:
        if self.val:
            val = self.validate()
            self.tracker.log(val, step)
            self.final.update(val)
        samples = generate_samples(self.s.trainee, self.s.reader, self.cfg, self.artifact_dir, step)
        if self.env.rank != 0:
            return
        if samples is not None:
            self.tracker.log_artifact(str(samples), "samples")
        if self.routing_since_eval is not None:
            self.routing.add(step, self.routing_since_eval)
            self.routing_since_eval = None
            self.tracker.log_artifact(str(self.routing.table), "routing")
            self.tracker.log_artifact(str(self.routing.heatmap), "routing")

    def validate(self) -> dict[str, float]:
        """``val/loss`` and, for a mixture, ``val/<source>/loss`` of each source with val rows."""
        val_loss = held_out_loss(self.s.trainee, self.val)
        out = {"val/loss": val_loss, "val/perplexity": perplexity(val_loss)}
        for name, batches in self.val_by_source.items():
            if batches:  # the same on every rank (one manifest), so the all-reduces match
                out[f"val/{name}/loss"] = held_out_loss(self.s.trainee, batches)
        return out

    def checkpoint(self, step: int) -> None:
        # Metrics up to a checkpoint must outlive a hard kill: the steps after it are
        # re-logged on resume, the ones before it never would be.
        self.tracker.flush()
        if not self.env.keeps_checkpoints:
            return
        local = Path(tempfile.mkdtemp(prefix="moe-ckpt-"))
        try:
            t = self.s.trainee
            save_checkpoint(
                local,
                t.module,
                t.optimizer,
                self.s.state,
                self.s.model_cfg,
                self.env.rank,
                t.expert_parallel,
            )
            self.last_checkpoint = self.env.save(local, step, dict(self.final))
        finally:
            remove_dir(local)

    def param_rank_spread(self) -> float:
        """max - min over ranks of a parameter checksum: 0 when all replicas agree."""
        if uses_fsdp(self.s.trainee.module):
            return math.nan
        ep = self.s.trainee.expert_parallel
        experts = {id(p) for p in ep.params.values()} if ep else set()
        with torch.no_grad():
            params = list(self.s.trainee.raw.parameters())
            zero = torch.zeros((), dtype=torch.float64, device=self.env.device)
            total = sum((p.double().sum() for p in params if id(p) not in experts), zero)
            if ep is not None:
                # A group's shards differ by design; their sum must agree across groups.
                shards = sum((p.double().sum() for p in ep.params.values()), zero)
                torch.distributed.all_reduce(shards, group=ep.ep_group)
                total = total + shards
            both = torch.stack([total, -total]).to(self.env.device)
            if self.env.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(both, op=dist.ReduceOp.MAX)
            return float(both[0] + both[1])


__all__ = ["run", "build", "Loop", "step_seed", "use_bf16", "all_reduce_sum"]


def _check_capacity(sampler: MixtureSampler, samples: int) -> None:
    """Say before the first step, not in the loader thread at step N, that data runs out."""
    if samples > sampler.capacity:
        raise JobError(
            f"train.max_steps: the run needs {samples} samples, but the sources' max_epochs "
            f"allow {int(sampler.capacity)}; raise data.sources[].max_epochs or lower "
            "train.max_steps"
        )


def _log_schedule(sampler: MixtureSampler) -> None:
    """When each source runs out (``max_epochs``) and how the rest share the samples after."""
    for phase in sampler.schedule:
        shares = ", ".join(f"{n} {v:.3f}" for n, v in phase["shares"].items())
        log.info("mixture from sample %d: %s", phase["start"], shares)
