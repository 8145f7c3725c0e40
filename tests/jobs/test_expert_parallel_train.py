"""Training steps with expert parallelism on 4 gloo processes (EP 2: two groups of two)
against one process that accumulates the same 4 micro batches, and checkpoints that do
not depend on the layout: what EP 2 saved on 4 workers loads in one process and resumes
there, and resumes at EP 2 on 2 workers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.train.checkpoint import (
    TrainerState,
    load_checkpoint_model,
    load_training_checkpoint,
    save_checkpoint,
)
from jobs.train.commit import write_commit
from jobs.train.config import TrainConfig
from jobs.train.distributed import parallelize
from jobs.train.expert_parallel import apply_expert_parallel
from jobs.train.optim import build_optimizer
from jobs.train.step import Trainee, train_step
from moe_model import ModelConfig, MoETransformer

WORLD, EP, STEPS = 4, 2, 3
LR, CLIP = 3e-3, 0.5  # a clip below the initial norm, so clipping is exercised
CFG = TrainConfig(weight_decay=0.1)


def model_config() -> ModelConfig:
    return ModelConfig.preset("debug", router_bias_update_rate=0.01)


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, 512, (2, 17), generator=g)


def fresh(seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(model_config())


def worker(rank: int, strategy: str, out: str) -> None:
    store = dist.FileStore(str(Path(out, "store")), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        cpu = torch.device("cpu")
        raw = fresh()
        ep = apply_expert_parallel(raw, EP, cpu)
        module = parallelize(raw, strategy, cpu, False, expert_params=ep.params)
        optimizer = build_optimizer(module, CFG, mixed=strategy == "fsdp")
        tr = Trainee(raw, module, optimizer, cpu, False, ep)
        for step in range(1, STEPS + 1):
            result = train_step(tr, [batch(step, rank)], LR, CLIP, poison=False)
            assert not result.skipped and (step > 1 or result.grad_norm > CLIP)
            if rank == 0:
                Path(out, f"loss{step}").write_text(repr(float(result.loss)))
            if step >= STEPS - 1:
                path = Path(out, f"ck{step}")
                state = TrainerState(step=step)
                save_checkpoint(path, module, tr.optimizer, state, model_config(), rank, ep)
                dist.barrier()
                if rank == 0:
                    write_commit(str(path), step)
    finally:
        dist.destroy_process_group()


def resume_on_two(rank: int, out: str) -> None:
    """EP 2 on 2 workers (one group, no dp replica) resumes the 4-worker run's step-2
    checkpoint under DDP and takes step 3 on the same 4 batches, 2 micro batches per rank."""
    world = 2
    store = dist.FileStore(str(Path(out, "store2")), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cpu = torch.device("cpu")
        raw = fresh(seed=1)
        ep = apply_expert_parallel(raw, EP, cpu)
        module = parallelize(raw, "ddp", cpu, False, expert_params=ep.params)
        optimizer = build_optimizer(module, CFG)
        state = load_training_checkpoint(Path(out, f"ck{STEPS - 1}"), module, optimizer, ep)
        tr = Trainee(raw, module, optimizer, cpu, False, ep)
        micro = [batch(state.step + 1, r) for r in (2 * rank, 2 * rank + 1)]
        result = train_step(tr, micro, LR, CLIP, poison=False)
        if rank == 0:
            Path(out, "resumed_on_two").write_text(repr(float(result.loss)))
    finally:
        dist.destroy_process_group()


def reference_steps(tr: Trainee, steps: range) -> list[float]:
    """One process, the 4 ranks' batches as 4 micro steps of one optimizer step."""
    return [
        train_step(tr, [batch(s, r) for r in range(WORLD)], LR, CLIP, poison=False).loss
        for s in steps
    ]


def single(model: MoETransformer) -> Trainee:
    return Trainee(model, model, build_optimizer(model, CFG), torch.device("cpu"), False)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_expert_parallel_steps_match_one_process_and_checkpoints_load_anywhere(strategy, tmp_path):
    torch.set_num_threads(1)
    mp.spawn(worker, args=(strategy, str(tmp_path)), nprocs=WORLD)

    ref = single(fresh())
    losses = reference_steps(ref, range(1, STEPS + 1))
    for step, loss in enumerate(losses, start=1):
        ep_loss = float((tmp_path / f"loss{step}").read_text())
        assert ep_loss == pytest.approx(loss, rel=1e-5), step
    loaded, _, state = load_checkpoint_model(str(tmp_path / f"ck{STEPS}"))
    assert state["step"] == STEPS
    ref_sd = ref.raw.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(
            value, ref_sd[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )

    # EP 2's step-2 checkpoint (weights, AdamW moments, router biases) resumes in one process.
    resumed = single(fresh(seed=1))
    load_training_checkpoint(tmp_path / f"ck{STEPS - 1}", resumed.module, resumed.optimizer)
    assert reference_steps(resumed, range(STEPS, STEPS + 1))[0] == pytest.approx(
        losses[-1], rel=1e-5
    )
    # ... and on 2 workers at EP 2 (another number of workers, the same global batch).
    mp.spawn(resume_on_two, args=(str(tmp_path),), nprocs=2)
    on_two = float((tmp_path / "resumed_on_two").read_text())
    assert on_two == pytest.approx(losses[-1], rel=1e-5)
    resumed_sd = resumed.raw.state_dict()
    for name, value in ref_sd.items():
        torch.testing.assert_close(
            resumed_sd[name], value, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )
