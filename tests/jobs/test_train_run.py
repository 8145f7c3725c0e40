"""Training end to end on a dataset built by the real ``prepare``.

Without Ray: the worker loop in this process (loss falls, exact resume, K
non-finite steps stop the run). With Ray (2 CPU workers, gloo): run A loses a
worker to SIGKILL and resumes by itself; run B goes through the CLI on S3,
crashes, and is resumed by a rerun with the same name. Their per-step losses
must match exactly, and a 1-worker run with gradient accumulation must match
within float tolerance.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from jobs.config import RootConfig
from jobs.errors import JobError
from jobs.settings import load_config
from jobs.train import loop
from jobs.train.checkpoint import load_checkpoint_model
from jobs.train.driver import train
from jobs.train.env import LocalEnv
from jobs.train.ray_worker import RayEnv

WORDS = "the cat sat on a mat while dog ran to big red house and small green tree near old river"
STEPS = 12
COMMON = [
    "model.preset=debug",
    f"train.max_steps={STEPS}",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=6",
    "train.eval_batches=2",
    "train.checkpoint_every=3",
    "train.warmup_steps=2",
    "train.lr=0.01",
    "train.inject_nan_steps=[8]",
    "train.sample_max_new_tokens=4",
    "train.sample_prompts=['the cat']",
]
# Same global batch (2 x 4 sequences of 32 tokens) on 1 worker with 2 micro steps.
ONE_WORKER = ["train.num_workers=1", f"train.global_batch_tokens={2 * 4 * 32}"]
TWO_WORKERS = ["train.num_workers=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as a Ray worker runs


def config(*extra: str) -> RootConfig:
    return load_config(RootConfig, None, [*COMMON, *extra])


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory) -> str:
    from pipeline.config import PrepareConfig
    from pipeline.prepare import prepare

    rng = random.Random(0)
    words = WORDS.split()
    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        sentences = [
            " ".join(rng.choice(words) for _ in range(rng.randint(4, 10))).capitalize() + "."
            for _ in range(30)
        ]
        (corpus / f"doc{i:03d}.txt").write_text(" ".join(sentences))
    cfg = PrepareConfig(
        name="train-tiny",
        inputs=[str(corpus)],
        seq_len=32,
        vocab_size=320,
        val_fraction=0.1,
        shard_rows=64,
    )
    return prepare(cfg, str(tmp_path_factory.mktemp("data")), progress=False, executor="local").uri


def local_losses(cfg: RootConfig, dataset: str, out: Path) -> tuple[dict, dict[int, float]]:
    losses: dict[int, float] = {}
    env = LocalEnv(out, keep=2, on_progress=lambda u: losses.__setitem__(u["step"], u["loss"]))
    return loop.run(cfg, dataset, env), losses


def test_local_loop_learns_and_resumes_exactly(dataset, tmp_path):
    cfg = config(*ONE_WORKER)
    result, full = local_losses(cfg, dataset, tmp_path / "a")
    assert result["steps"] == STEPS and result["skipped_steps"] == 1
    assert math.isnan(full[8]) and len(full) == STEPS
    assert full[STEPS] < full[1] - 1.0
    assert result["metrics"]["val/loss"] < 5.5 and "val/perplexity" in result["metrics"]

    shutil.copytree(tmp_path / "a" / "checkpoint_00000009", tmp_path / "b" / "checkpoint_00000009")
    resumed, tail = local_losses(cfg, dataset, tmp_path / "b")
    assert sorted(tail) == [10, 11, 12]
    assert all(tail[s] == full[s] for s in tail)


def test_fsdp_and_bf16_mixed_precision_train_on_cpu(dataset, tmp_path):
    """FSDP2 on one gloo rank: fp32 matches the plain loop bit for bit; bf16 compute
    (fp32 master weights, the GPU default) stays close, and its checkpoint loads."""
    import torch.distributed as dist

    short = (*ONE_WORKER, "train.max_steps=4", "train.inject_nan_steps=[]")
    try:
        _, plain = local_losses(config(*short), dataset, tmp_path / "plain")
        _, sharded = local_losses(config(*short, "train.strategy=fsdp"), dataset, tmp_path / "f")
        bf16, mixed = local_losses(config(*short, "train.precision=bf16"), dataset, tmp_path / "b")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert sharded == plain
    assert mixed == pytest.approx(plain, rel=2e-2)
    model, _, state = load_checkpoint_model(bf16["checkpoint"])
    assert state["step"] == 4 and next(model.parameters()).dtype.is_floating_point


def test_init_from_starts_from_another_runs_weights(dataset, tmp_path):
    root = f"storage.root={tmp_path}"  # init_from must lie inside the storage root
    cfg = config(*ONE_WORKER, "train.max_steps=6", "train.inject_nan_steps=[]", root)
    trained, losses = local_losses(cfg, dataset, tmp_path / "a")
    one = config(*ONE_WORKER, "train.max_steps=1", "train.warmup_steps=0", root)
    _, fresh = local_losses(one, dataset, tmp_path / "fresh")
    env = LocalEnv(tmp_path / "b", on_progress=lambda u: fresh.__setitem__("init", u["loss"]))
    loop.run(one, dataset, env, init_from=trained["checkpoint"])
    assert fresh["init"] < fresh[1] - 1.0 and fresh["init"] == pytest.approx(losses[6], abs=0.5)
    with pytest.raises(JobError, match="init_from .*model config differs"):
        bigger = config(*ONE_WORKER, "train.max_steps=1", "model.num_layers=3", root)
        loop.run(bigger, dataset, LocalEnv(tmp_path / "c"), init_from=trained["checkpoint"])


def test_consecutive_nonfinite_steps_stop_and_name_the_last_good_checkpoint(dataset, tmp_path):
    cfg = config(
        *ONE_WORKER,
        "train.inject_nan_steps=[5,6,7]",
        "train.max_consecutive_skips=3",
        "train.checkpoint_every=4",
    )
    result, _ = local_losses(cfg, dataset, tmp_path)
    assert result["steps"] == 7
    assert "3 consecutive non-finite steps (last at step 7)" in result["aborted"]
    assert str(tmp_path / "checkpoint_00000004") in result["aborted"]


def mlflow_losses(client: MlflowClient, run_id: str) -> dict[int, set[float]]:
    out: dict[int, set[float]] = {}
    for m in client.get_metric_history(run_id, "train/loss"):
        out.setdefault(m.step, set()).add(m.value)
    return out


@pytest.fixture(scope="module")
def run_a(dataset, mlflow_server, tmp_path_factory):
    """2 workers; rank 1 SIGKILLs itself after step 5; Ray restarts from checkpoint 3."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    storage = tmp_path_factory.mktemp("run-a")
    cfg = config(
        *TWO_WORKERS,
        "train.max_failures=1",
        "train.inject_kill_step=5",
        "train.inject_kill_rank=1",
        "train.inject_nan_rank=1",
        f"storage.root={storage}",
        f"tracking.uri={mlflow_server}",
    )
    try:
        result = train(cfg, dataset, run_name="run-a", progress=False)
    finally:
        mp.undo()
    return cfg, result, storage


@pytest.mark.slow
def test_killed_worker_resumes_and_everything_reaches_mlflow(run_a, mlflow_server):
    cfg, result, storage = run_a
    assert result.steps == STEPS and result.run_name == "run-a"
    assert result.checkpoint_uri == str(storage / "runs" / "run-a" / "checkpoint_00000012")
    assert result.metrics["train/skipped_steps"] == 1.0
    assert result.metrics["check/param_rank_spread"] == 0.0
    kept = sorted(p.name for p in (storage / "runs" / "run-a").glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000006", "checkpoint_00000009", "checkpoint_00000012"]
    # Each checkpoint was committed after BOTH ranks' shards were in place.
    for name in kept:
        listed = json.loads((storage / "runs" / "run-a" / name / "commit.json").read_text())
        assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "trainer_state.json"} <= set(
            listed["files"]
        ), listed

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    losses = mlflow_losses(client, result.mlflow_run_id)
    assert sorted(losses) == [s for s in range(1, STEPS + 1) if s != 8]
    # Steps 4-5 ran before the kill and again after the resume: same values, bit for bit.
    assert all(len(v) == 1 for v in losses.values()), losses
    assert max(losses[STEPS]) < max(losses[1]) - 1.0

    keys = set(run.data.metrics)
    expected = {
        "train/loss", "train/ce_loss", "train/aux_loss", "train/z_loss", "train/lr",
        "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "perf/step_time_s",
        "perf/data_wait_frac", "val/loss", "val/perplexity",
    }  # fmt: skip
    for layer in ("00", "01"):
        for name in ("load_imbalance", "router_entropy", "dead_experts"):
            expected.add(f"moe/layer_{layer}/{name}")
    assert expected <= keys, expected - keys
    assert any(k.startswith("system/") for k in keys)
    assert run.data.params["train.lr"] == "0.01"
    assert run.data.tags["checkpoint_uri"] == result.checkpoint_uri
    artifacts = {
        a.path for d in ("routing", "samples") for a in client.list_artifacts(run.info.run_id, d)
    }
    assert artifacts == {
        "routing/expert_tokens.csv",
        "routing/expert_heatmap.png",
        "samples/generations.txt",
    }
    assert 0.0 < run.data.metrics["perf/mfu"] < 1.0


def result_lines(invoked) -> list[str]:
    """The command's own stdout lines: the shared test Ray may forward a stray worker
    line after training (a CLI process that starts its own Ray shuts it down first)."""
    return [line for line in invoked.stdout.splitlines() if "pid=" not in line and line.strip()]


@pytest.fixture(scope="module")
def run_b(dataset, s3_endpoint, mlflow_server, tmp_path_factory):
    """The CLI on S3, uninterrupted; then the same command with --max-steps 14 continues it."""
    import s3fs

    from jobs.cli import app

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    bucket = f"train-run-b-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.put(dataset.rstrip("/") + "/", f"{bucket}/data/", recursive=True)
    args = [
        "train", "--dataset", f"s3://{bucket}/data", "--storage", f"s3://{bucket}",
        "--run-name", "run-b", "--num-workers", "2", "--checkpoint-every", "3",
        "--tracking-uri", mlflow_server, "--quiet",
        *(x for item in COMMON for x in ("--set", item)),
    ]  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--max-steps", str(STEPS)])
    more = runner.invoke(app, [*args, "--max-steps", str(STEPS + 2)])
    return first, more, bucket, fs


@pytest.mark.slow
def test_cli_on_s3_matches_the_killed_run_exactly_and_a_rerun_continues(
    run_a, run_b, mlflow_server
):
    first, more, bucket, fs = run_b
    assert first.exit_code == 0, first.output
    uri = result_lines(first)[-1]
    assert uri == f"s3://{bucket}/runs/run-b/checkpoint_00000012"
    assert fs.exists(f"{bucket}/runs/run-b/checkpoint_00000012/dcp/.metadata")
    listed = json.loads(fs.cat_file(f"{bucket}/runs/run-b/checkpoint_00000012/commit.json"))
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(listed["files"]), listed
    model, model_cfg, state = load_checkpoint_model(uri)
    assert state["step"] == STEPS and state["skipped_steps"] == 1 and model_cfg.num_layers == 2

    assert more.exit_code == 0, more.output
    assert result_lines(more)[-1] == f"s3://{bucket}/runs/run-b/checkpoint_00000014"
    client = MlflowClient(mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("moe-pretrain").experiment_id],
        filter_string="attributes.run_name = 'run-b'",
    )
    assert len(runs) == 1
    losses_b = mlflow_losses(client, runs[0].info.run_id)
    losses_a = mlflow_losses(client, run_a[1].mlflow_run_id)
    assert sorted(losses_b) == sorted(losses_a) + [13, 14]
    for step in losses_a:
        assert losses_a[step] == losses_b[step], (step, losses_a[step], losses_b[step])


@pytest.mark.slow
def test_one_worker_with_accumulation_matches_two_workers(run_a, dataset, mlflow_server, tmp_path):
    _, single = local_losses(config(*ONE_WORKER), dataset, tmp_path)
    losses_a = mlflow_losses(MlflowClient(mlflow_server), run_a[1].mlflow_run_id)
    assert math.isnan(single[8]) and 8 not in losses_a
    for step, values in losses_a.items():
        assert single[step] == pytest.approx(next(iter(values)), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_rerun_refuses_another_model_or_dataset(run_a, dataset, tmp_path):
    cfg, _, storage = run_a
    bigger = cfg.model_copy(deep=True)
    bigger.model = type(cfg.model).model_validate({"preset": "debug", "num_layers": 3})
    with pytest.raises(JobError, match=r"model config changed \(num_layers: 2 -> 3\)"):
        train(bigger, dataset, run_name="run-a", progress=False)

    other = tmp_path / "other-dataset"
    shutil.copytree(dataset, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"] = "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(JobError, match="dataset fingerprint changed.*0123456789abcdef"):
        train(cfg, str(other), run_name="run-a", progress=False)


def test_worker_failures_become_one_line_errors():
    from ray.train import WorkerGroupError

    from jobs.train.driver import _user_error

    def wrapped(cause: Exception) -> Exception:
        outer = RuntimeError("task failed")
        outer.cause = cause
        return outer

    user = _user_error(WorkerGroupError("x", {1: wrapped(JobError("model.vocab_size: too small"))}))
    assert isinstance(user, JobError) and str(user) == "model.vocab_size: too small"
    other = _user_error(WorkerGroupError("x", {0: wrapped(ValueError("boom\nmore"))}))
    assert str(other) == "training failed on worker 0: ValueError: boom"


def test_ray_env_kill_hook_fires_once_per_run_and_step(tmp_path):
    env = RayEnv.__new__(RayEnv)
    env.run_uri = str(tmp_path / f"run-{random.random()}")
    assert env.should_kill(5) is True
    assert env.should_kill(5) is False
    assert env.should_kill(6) is True


def test_a_run_name_cannot_write_outside_the_storage_root(dataset, tmp_path):
    from jobs.paths import PathEscapeError

    cfg = config(f"storage.root={tmp_path / 'root'}")
    with pytest.raises(PathEscapeError, match="outside the storage root"):
        train(cfg, dataset, run_name="../../escaped", progress=False)
    assert not (tmp_path / "escaped").exists()
