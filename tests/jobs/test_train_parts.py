"""Pieces of the trainer on their own: config, sampler, schedule, optimizer groups, one
step with a poisoned loss, the checkpoint format, metrics and routing artifacts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jobs.errors import JobError
from jobs.settings import ConfigError
from jobs.tracking.artifacts import RoutingArtifacts
from jobs.train.checkpoint import (
    TrainerState,
    check_resume,
    load_checkpoint_model,
    load_training_checkpoint,
    model_config_hash,
    save_checkpoint,
)
from jobs.train.commit import write_commit
from jobs.train.config import TrainConfig
from jobs.train.lr_schedule import lr_at
from jobs.train.monitor import DeadExpertWatch, IntervalStats
from jobs.train.optim import build_optimizer, decays
from jobs.train.perf import Meter
from jobs.train.sampler import Sampler, micro_batch_samples
from jobs.train.step import Trainee, train_step
from moe_model import ModelConfig, MoETransformer


def test_grad_accum_is_derived_from_global_batch_tokens():
    cfg = TrainConfig(micro_batch_size=4, global_batch_tokens=4 * 32 * 4)
    assert cfg.grad_accum(seq_len=32, world_size=1) == 4
    assert cfg.grad_accum(seq_len=32, world_size=2) == 2
    assert cfg.global_batch_size(32, 1) == cfg.global_batch_size(32, 2) == 16
    assert TrainConfig(micro_batch_size=4).grad_accum(32, 3) == 1
    with pytest.raises(ConfigError, match="train.global_batch_tokens"):
        cfg.grad_accum(seq_len=32, world_size=3)


def test_expert_parallel_size_must_divide_experts_and_workers():
    TrainConfig(expert_parallel_size=4).check_expert_parallel(num_experts=8, world_size=8)
    with pytest.raises(ConfigError) as e:
        TrainConfig(expert_parallel_size=3).check_expert_parallel(num_experts=8, world_size=6)
    assert str(e.value) == (
        "train.expert_parallel_size: must divide model.num_experts (8) and "
        "train.num_workers (6), got 3"
    )
    with pytest.raises(ConfigError, match="train.num_workers \\(3\\), got 2"):
        TrainConfig(expert_parallel_size=2).check_expert_parallel(num_experts=8, world_size=3)


def test_sampler_is_a_pure_function_of_seed_epoch_and_index():
    shard_rows = [5, 7, 3, 9]
    a, b = Sampler(shard_rows, seed=1, window=2), Sampler(shard_rows, seed=1, window=2)
    n = a.num_rows
    epoch0 = a.rows(0, n)
    assert sorted(epoch0.tolist()) == list(range(n))
    assert np.array_equal(a.rows(7, 20), b.rows(7, 20))
    assert np.array_equal(a.rows(n + 3, 5), b.rows(0, 2 * n)[n + 3 : n + 8])
    assert not np.array_equal(a.rows(n, n), epoch0)
    assert not np.array_equal(Sampler(shard_rows, seed=2, window=2).rows(0, n), epoch0)


def test_sampler_windows_keep_rows_of_a_window_together():
    shard_rows = [10] * 6
    s = Sampler(shard_rows, seed=0, window=2)
    shard, offset = s.locate(s.rows(0, 60))
    for w in range(3):
        assert len(set(shard[20 * w : 20 * (w + 1)].tolist())) == 2
    assert np.all(offset < 10)
    uniform = Sampler(shard_rows, seed=0, window=100).locate(
        Sampler(shard_rows, 0, 100).rows(0, 20)
    )
    assert len(set(uniform[0].tolist())) > 2


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_rank_slices_cover_the_same_global_batch_for_any_world_size(world, accum):
    micro, step_start = 3, 24
    seen = []
    for rank in range(world):
        for m in range(accum):
            first, count = micro_batch_samples(step_start, rank, world, m, micro)
            seen.extend(range(first, first + count))
    assert sorted(seen) == list(range(step_start, step_start + micro * world * accum))


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[0] == pytest.approx(0.2) and lrs[3] == pytest.approx(0.8)
    assert lrs[4] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_at(10, cfg.model_copy(update={"schedule": "constant"})) == 1.0
    short = TrainConfig(lr=1.0, warmup_steps=50, max_steps=5)
    assert all(math.isfinite(lr_at(s, short)) and lr_at(s, short) <= 1.0 for s in range(5))


def test_no_weight_decay_on_norms_embeddings_and_vectors():
    model = MoETransformer(ModelConfig.preset("debug"))
    names = {n for n, p in model.named_parameters() if not decays(n, p)}
    assert "embed.weight" in names and "norm.weight" in names
    assert any("attn_norm" in n for n in names)
    assert "lm_head.weight" not in names
    assert not any("w13" in n or "q_proj" in n for n in names)
    groups = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def _trainee(seed: int = 0) -> Trainee:
    torch.manual_seed(seed)
    model = MoETransformer(ModelConfig.preset("debug"))
    opt = build_optimizer(model, TrainConfig())
    return Trainee(model, model, opt, torch.device("cpu"), bf16=False)


def _batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (2, 17), generator=g) for _ in range(n)]


def _snapshot(tr: Trainee) -> tuple[dict, dict]:
    params = {k: v.clone() for k, v in tr.raw.state_dict().items()}
    state = tr.optimizer.state_dict()["state"]
    opt = {k: {n: t.clone() for n, t in s.items()} for k, s in state.items()}
    return params, opt


def test_a_poisoned_step_is_skipped_with_parameters_and_optimizer_unchanged():
    tr = _trainee()
    first = train_step(tr, _batches(seed=1), lr=1e-3, grad_clip=1.0, poison=False)
    assert not first.skipped and math.isfinite(first.loss)
    before_params, before_opt = _snapshot(tr)
    poisoned = train_step(tr, _batches(seed=2), lr=1e-3, grad_clip=1.0, poison=True)
    assert poisoned.skipped
    after_params, after_opt = _snapshot(tr)
    assert all(torch.equal(before_params[k], after_params[k]) for k in before_params)
    assert all(
        torch.equal(before_opt[k][n], after_opt[k][n]) for k in before_opt for n in before_opt[k]
    )
    assert all(p.grad is None for p in tr.raw.parameters())
    again = train_step(tr, _batches(seed=3), lr=1e-3, grad_clip=1.0, poison=False)
    assert not again.skipped and math.isfinite(again.grad_norm)


def test_train_step_optimises_the_models_own_loss_bit_for_bit():
    """The trainer's step and `model(inputs, targets=...)` are one loss path: the same loss
    and, at the optimizer (clipping at an infinite norm scales by exactly 1), the same grads."""
    tr, batch = _trainee(0), _batches(1, seed=4)[0]
    seen: dict[int, torch.Tensor] = {}

    def keep_grads(opt, args, kwargs):
        for group in opt.param_groups:
            seen.update({id(p): p.grad.clone() for p in group["params"] if p.grad is not None})

    tr.optimizer.register_step_pre_hook(keep_grads)
    result = train_step(tr, [batch], lr=1e-3, grad_clip=0.0, poison=False)
    reference = _trainee(0).raw
    out = reference(batch[:, :-1], targets=batch[:, 1:])
    out.loss.backward()
    assert out.logits is None
    assert result.loss == out.loss.item() and result.ce_loss == out.ce_loss.item()
    pairs = zip(tr.raw.named_parameters(), reference.parameters(), strict=True)
    for (name, trained), ref in pairs:
        assert torch.equal(seen[id(trained)], ref.grad), name


def test_checkpoint_round_trip_is_exact_and_holds_no_pickles(tmp_path):
    tr = _trainee(0)
    train_step(tr, _batches(seed=1), lr=1e-3, grad_clip=1.0, poison=False)
    cfg = tr.raw.config
    state = TrainerState(
        step=1, samples_seen=4, dataset_fingerprint="fp", model_config_hash=model_config_hash(cfg)
    )
    save_checkpoint(tmp_path / "ck", tr.module, tr.optimizer, state, cfg, rank=0)
    files = sorted(p.name for p in (tmp_path / "ck").rglob("*") if p.is_file())
    assert files == [
        ".metadata", "__0_0.distcp", "model_config.json", "optim_state.json", "trainer_state.json"
    ]  # fmt: skip
    # Only tensors in DCP: nothing there would be decoded with torch.load(weights_only=False).
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from jobs.safe_load import safe_dcp_reader

    entries = safe_dcp_reader(tmp_path / "ck" / "dcp").read_metadata().state_dict_metadata
    assert not [k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)]

    other = _trainee(1)
    restored = load_training_checkpoint(tmp_path / "ck", other.module, other.optimizer)
    assert restored == state
    ref, got = _snapshot(tr), _snapshot(other)
    assert all(torch.equal(ref[0][k], got[0][k]) for k in ref[0])
    assert all(torch.equal(ref[1][k][n], got[1][k][n]) for k in ref[1] for n in ref[1][k])
    a = train_step(tr, _batches(seed=5), lr=1e-3, grad_clip=1.0, poison=False)
    b = train_step(other, _batches(seed=5), lr=1e-3, grad_clip=1.0, poison=False)
    assert a.loss == b.loss and a.grad_norm == b.grad_norm

    with pytest.raises(JobError, match="not complete.*no commit.json"):
        load_checkpoint_model(str(tmp_path / "ck"))  # nothing committed it yet
    write_commit(str(tmp_path / "ck"), 1)
    model, model_cfg, trainer_state = load_checkpoint_model(str(tmp_path / "ck"))
    assert model_cfg == cfg and trainer_state["step"] == 1
    assert all(torch.equal(ref[0][k], v) for k, v in model.state_dict().items())


def test_resume_refuses_another_dataset_or_model_and_says_which():
    cfg = ModelConfig.preset("debug")
    state = TrainerState(dataset_fingerprint="aaa", model_config_hash=model_config_hash(cfg))
    check_resume(state, "aaa", cfg, "ckpt")
    with pytest.raises(JobError, match="dataset fingerprint changed.*aaa.*bbb"):
        check_resume(state, "bbb", cfg, "ckpt")
    bigger = cfg.replace(num_layers=3)
    with pytest.raises(JobError, match="model config changed.*num_layers: 2 -> 3"):
        check_resume(state, "aaa", bigger, "ckpt", saved_model=cfg.to_dict())
    with pytest.raises(JobError, match="no checkpoint at"):
        load_checkpoint_model("/nonexistent/checkpoint_00000001")


def test_interval_stats_average_unskipped_steps_and_name_layers():
    tr = _trainee()
    stats = IntervalStats(num_layers=2, num_experts=4)
    results = [train_step(tr, _batches(seed=s), 1e-3, 1.0, poison=s == 2) for s in range(3)]
    for r in results:
        stats.add(r)
    m = stats.metrics()
    assert m["train/loss"] == pytest.approx((results[0].loss + results[1].loss) / 2)
    for key in ("load_imbalance", "router_entropy", "dead_experts"):
        assert f"moe/layer_01/{key}" in m
    assert m["moe/layer_00/load_imbalance"] >= 1.0


def test_dead_expert_warning_after_patience_steps(caplog):
    watch = DeadExpertWatch(num_layers=1, num_experts=3, patience=3, idle=[])
    tokens = np.array([[5.0, 0.0, 2.0]])
    assert watch.update(tokens, 1) == [] and watch.update(tokens, 2) == []
    with caplog.at_level("WARNING", logger="jobs.train"):
        assert watch.update(tokens, 3) == [(0, 1)]
    assert "expert 1 of layer 0 received no tokens for 3 steps" in caplog.text
    assert watch.update(tokens, 4) == []
    assert DeadExpertWatch(1, 3, 3, watch.state()).idle.tolist() == [[0, 4, 0]]


def test_meter_reports_throughput_mfu_and_data_wait():
    meter = Meter(flops_per_token=1e6, peak_per_device=1e9, world_size=2)
    meter.add(tokens=1000, step_time=0.5, data_wait=0.01)
    meter.add(tokens=1000, step_time=0.5, data_wait=0.0)
    m = meter.metrics()
    assert m["perf/tokens_per_s"] == pytest.approx(2000)
    assert m["perf/mfu"] == pytest.approx(2000 * 1e6 / 2e9)
    assert m["perf/data_wait_frac"] == pytest.approx(0.01)
    assert m["perf/step_time_s"] == pytest.approx(0.5)


def test_progress_bar_shows_step_loss_and_throughput():
    from jobs.train.progress import ProgressBar

    with ProgressBar(total=10, description="run-x", enabled=False) as bar:
        bar.update({"step": 4, "max_steps": 10, "loss": 2.5, "tokens_per_s": 12345.6})
        bar.update(None)
        task = bar.progress.tasks[0]
        assert (task.completed, task.total) == (4, 10)
        assert task.fields == {"loss": "2.5000", "tps": "12,346"}
        bar.update({"step": 5, "max_steps": 10, "loss": math.nan, "tokens_per_s": math.nan})
        assert bar.progress.tasks[0].fields == {"loss": "-", "tps": "-"}


def test_routing_artifacts_table_and_heatmap(tmp_path):
    art = RoutingArtifacts(tmp_path)
    art.add(10, np.array([[3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]]))
    art.add(20, np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0]]))
    lines = art.table.read_text().splitlines()
    assert lines[0] == "step,layer,expert,tokens,fraction" and len(lines) == 1 + 2 * 8
    assert lines[1] == "10,0,0,3,0.375000"
    assert art.heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(TrainerState().to_json())


def test_training_a_dataset_without_train_rows_names_why_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.config import PrepareConfig
    from pipeline.prepare import prepare

    (tmp_path / "c").mkdir()
    for i in range(3):
        (tmp_path / "c" / f"{i}.txt").write_text("tiny")  # every document too short
    cfg = PrepareConfig(inputs=[str(tmp_path / "c")], seq_len=16, vocab_size=300,
                        clean={"min_chars": 10})  # fmt: skip
    uri = prepare(cfg, str(tmp_path / "out"), progress=False, executor="local").uri
    cli = Path(sys.executable).parent / "moe-pretrain"
    out = subprocess.run([str(cli), "train", "--dataset", uri, "--preset", "debug",
                          "--storage", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the dataset has no training rows") and "too_short 3" in last
