"""Training on a mixture built by the real ``prepare``: per-source val loss, exact resume."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pytest

from jobs.config import RootConfig
from jobs.settings import load_config
from jobs.train import loop
from jobs.train.env import LocalEnv
from jobs.train.mixture_sampler import train_sampler
from pipeline.reader import DatasetReader

WORDS = "the cat sat on a mat while dog ran to big red house and small green tree near old river"
STEPS = 6
SETTINGS = [
    "model.preset=debug",
    f"train.max_steps={STEPS}",
    "train.micro_batch_size=4",
    "train.num_workers=1",
    f"train.global_batch_tokens={2 * 4 * 32}",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.checkpoint_every=3",
    "train.warmup_steps=1",
    "train.sample_max_new_tokens=2",
    "train.sample_prompts=['the cat']",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as a Ray worker runs


def write_docs(folder: Path, rng: random.Random, docs: int, sentences: int) -> Path:
    folder.mkdir()
    words = WORDS.split()
    for i in range(docs):
        text = " ".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(4, 10))).capitalize() + "."
            for _ in range(sentences)
        )
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> str:
    from pipeline.config import PrepareConfig
    from pipeline.prepare import prepare

    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    web = write_docs(root / "web", rng, 20, 30)
    code = write_docs(root / "code", rng, 2, 12)
    cfg = PrepareConfig(
        name="mix-tiny",
        sources=[
            {"name": "web", "inputs": [str(web)], "weight": 3},
            {"name": "code", "inputs": [str(code)], "weight": 1, "max_epochs": 2},
        ],
        seq_len=32,
        vocab_size=320,
        val_fraction=0.1,
        shard_rows=16,
    )
    out = tmp_path_factory.mktemp("data")
    return prepare(cfg, str(out), progress=False, executor="local").uri


def run(cfg: RootConfig, dataset: str, out: Path) -> tuple[dict, dict[int, float]]:
    losses: dict[int, float] = {}
    env = LocalEnv(out, keep=2, on_progress=lambda u: losses.__setitem__(u["step"], u["loss"]))
    return loop.run(cfg, dataset, env), losses


def test_the_small_source_runs_out_within_the_run(mixture):
    reader = DatasetReader(mixture)
    code = next(m for m in reader.mixture if m["name"] == "code")
    sampler = train_sampler(reader, seed=0, window=8)
    samples = STEPS * 8
    assert 2 * code["rows"]["train"] < samples / 4, "max_epochs must bind in this run"
    assert sampler.schedule[1]["shares"] == {"web": 1.0, "code": 0.0}


def test_val_loss_per_source_and_exact_resume(mixture, tmp_path, caplog):
    cfg = load_config(RootConfig, None, SETTINGS)
    with caplog.at_level(logging.INFO, logger="jobs.train"):
        result, full = run(cfg, mixture, tmp_path / "a")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mixture from")]
    assert said[0] == "mixture from sample 0: web 0.750, code 0.250"
    assert said[1].endswith("web 1.000, code 0.000"), "the run logs when code runs out"
    metrics = result["metrics"]
    assert {"val/loss", "val/web/loss", "val/code/loss"} <= set(metrics)
    assert metrics["val/web/loss"] != metrics["val/code/loss"]
    low, high = sorted([metrics["val/web/loss"], metrics["val/code/loss"]])
    assert low <= metrics["val/loss"] <= high

    shutil.copytree(tmp_path / "a" / "checkpoint_00000003", tmp_path / "b" / "checkpoint_00000003")
    _, tail = run(cfg, mixture, tmp_path / "b")
    assert sorted(tail) == [4, 5, 6]
    assert all(tail[s] == full[s] for s in tail)
