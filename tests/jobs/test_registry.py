"""Model registry against a real ``mlflow server``: HF files, aliases, the champion gate,
export-hf and generate from ``models:/`` URIs."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from jobs.config import RootConfig
from jobs.service import steps as dag_steps
from jobs.service.evaluate import evaluate_model, loss_on
from jobs.service.lineage import dataset_lineage
from jobs.service.registry import CANDIDATE, CHAMPION
from jobs.service.steps.base import Context, StepOutcome
from jobs.service.steps.cache import StepCache
from jobs.service.steps.model import eval_sets
from jobs.service.tracking import Runs
from jobs.settings import build
from moe_model import MoETransformer

TEXT = (
    "the router sends every token to two experts and each expert learns a part of the "
    "language while the load stays balanced across layers"
)
WORDS = TEXT.split(" ")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from pipeline.config import PrepareConfig
    from pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("registry-data")
    rng = random.Random(0)
    for i in range(6):
        lines = (" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(60))
        (root / "corpus").mkdir(exist_ok=True)
        (root / "corpus" / f"doc{i}.txt").write_text("\n".join(lines))
    cfg = PrepareConfig(
        name="reg", inputs=[str(root / "corpus")], seq_len=32, vocab_size=300, val_fraction=0.2
    )
    return prepare(cfg, str(root / "out"), progress=False, executor="local").uri


def make_cfg(tmp_path: Path, **evaluate) -> RootConfig:
    return build(
        RootConfig,
        {
            "storage": {"root": str(tmp_path / "out")},
            "tracking": {"experiment": f"registry-{uuid.uuid4().hex[:6]}"},
            "registry": {"model_name": f"reg-{uuid.uuid4().hex[:8]}"},
            "model": {"preset": "debug", "vocab_size": 300, "max_seq_len": 64},
            "evaluate": {"batch_size": 8, "max_batches": 2, "max_new_tokens": 4, **evaluate},
        },
    )


def make_context(cfg: RootConfig, dataset_uri: str):
    from pipeline.reader import DatasetReader

    reader = DatasetReader(dataset_uri)
    ctx = Context(cfg, Runs(cfg), StepCache(cfg.storage.root))
    ctx.lineage = {**dataset_lineage(reader.manifest, reader.uri), "lineage.checkpoint_uri": "x"}
    data = StepOutcome(
        "prepare",
        True,
        reader.fingerprint,
        None,
        {"dataset_uri": reader.uri, "manifest": reader.manifest},
    )
    return ctx, data, reader


def untrained(cfg: RootConfig) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(cfg.model.build()).eval()


def trained(cfg: RootConfig, reader, steps: int = 10) -> MoETransformer:
    """A few Adam steps on the train split: clearly lower val loss than the initial weights."""
    model = untrained(cfg).train()
    rows = torch.from_numpy(reader.read_shard("train", 0).astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = rows[(step * 8) % (len(rows) - 8) :][:8]
        out = model(batch[:, :-1], labels=batch[:, :-1])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def models(dataset, tmp_path_factory) -> tuple[MoETransformer, MoETransformer]:
    """(untrained, briefly trained): the same architecture, clearly different val loss."""
    from pipeline.reader import DatasetReader

    cfg = make_cfg(tmp_path_factory.mktemp("models"))
    return untrained(cfg), trained(cfg, DatasetReader(dataset))


def register(ctx, data, reader, model, tag: str):
    tok = reader.load_tokenizer()
    result = evaluate_model(
        model, tok, eval_sets(ctx, reader, tok), ctx.cfg.evaluate, reader.eos_token_id
    )
    outputs = {
        "metrics": result.metrics,
        "eval_data": result.eval_data,
        "samples": [],
        "model": model,
    }
    evaluated = StepOutcome("evaluate", False, f"eval-{tag}", None, outputs)
    return dag_steps.register(ctx, data, evaluated), result


def test_champion_gate_both_ways(dataset, models, mlflow_uri, tmp_path):
    cfg = make_cfg(tmp_path)
    ctx, data, reader = make_context(cfg, dataset)
    client, name = ctx.runs.client, cfg.registry.model_name
    bad, good = models

    first, bad_eval = register(ctx, data, reader, bad, "bad")
    assert first.outputs["became_champion"] == "true"
    assert "no champion yet" in first.outputs["decision"].reason

    second, good_eval = register(ctx, data, reader, good, "good")
    d = second.outputs["decision"]
    assert good_eval.metrics["val/loss"] < bad_eval.metrics["val/loss"] - 0.5
    assert d.promote and d.champion_version == first.outputs["version"]
    assert d.new_loss == pytest.approx(good_eval.metrics["val/loss"])
    assert d.champion_loss == pytest.approx(bad_eval.metrics["val/loss"])
    assert client.get_model_version_by_alias(name, CHAMPION).version == second.outputs["version"]

    third, _ = register(ctx, data, reader, bad, "bad-again")
    d = third.outputs["decision"]
    assert not d.promote and "does not beat" in d.reason
    assert client.get_model_version_by_alias(name, CHAMPION).version == second.outputs["version"]
    assert client.get_model_version_by_alias(name, CANDIDATE).version == third.outputs["version"]

    # The decision and both numbers are on the register step's run and on the version.
    run = client.get_run(third.run_id)
    assert run.data.tags["gate.decision"] == "keep"
    assert run.data.metrics["gate/champion_loss"] == pytest.approx(good_eval.metrics["val/loss"])
    assert run.data.metrics["gate/new_loss"] == pytest.approx(bad_eval.metrics["val/loss"])
    mv = client.get_model_version(name, third.outputs["version"])
    assert mv.tags["moe.became_champion"] == "false"
    assert mv.tags["lineage.dataset_fingerprint"] == data.fingerprint
    assert mv.tags["lineage.tokenizer_sha256"] == reader.manifest["tokenizer"]["sha256"]

    # Same inputs again: the register step is a cache hit, no new version.
    again, _ = register(ctx, data, reader, bad, "bad-again")
    assert again.cache_hit and again.outputs["version"] == third.outputs["version"]


def test_gate_rescores_champion_on_new_eval_data(
    dataset, models, mlflow_uri, tmp_path, monkeypatch
):
    """When the eval rows change, the champion is re-evaluated on the new rows, not trusted;
    its downloaded copy does not stay behind in the temporary folder."""
    cfg = make_cfg(tmp_path, max_batches=2)
    ctx, data, reader = make_context(cfg, dataset)
    bad, good = models
    register(ctx, data, reader, good, "good")

    cfg1 = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"max_batches": 1})})
    ctx1, data1, _ = make_context(cfg1, dataset)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out, _ = register(ctx1, data1, reader, bad, "bad-fewer-rows")
    assert list(scratch.iterdir()) == []
    d = out.outputs["decision"]
    rows = eval_sets(ctx1, reader, reader.load_tokenizer())[0].rows
    assert "re-evaluated" in d.reason and not d.promote
    assert d.champion_loss == pytest.approx(loss_on(good, rows, 8)[0]["loss"], rel=1e-5)


def _register_in_child(cfg, dataset_uri, model, tag, barrier, results) -> None:
    """One process's register, started at the same moment as the other's (``barrier``)."""
    ctx, data, reader = make_context(cfg, dataset_uri)
    tok = reader.load_tokenizer()
    sets = eval_sets(ctx, reader, tok)
    result = evaluate_model(model, tok, sets, cfg.evaluate, reader.eos_token_id)
    outputs = {"metrics": result.metrics, "eval_data": result.eval_data, "samples": [],
               "model": model}  # fmt: skip
    evaluated = StepOutcome("evaluate", False, f"eval-{tag}", None, outputs)
    barrier.wait(timeout=300)
    out = dag_steps.register(ctx, data, evaluated)
    results.put((tag, out.outputs["version"]))


def test_two_registers_at_once_leave_the_better_champion(dataset, models, mlflow_uri, tmp_path):
    """Two processes register a worse and a better model at the same moment: whichever
    gate runs first, the better one ends as champion."""
    import multiprocessing

    cfg = make_cfg(tmp_path)
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(2), spawn.Queue()
    procs = [
        spawn.Process(target=_register_in_child, args=(cfg, dataset, m, tag, barrier, results))
        for m, tag in zip(models, ("worse", "better"), strict=True)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    versions = dict(results.get(timeout=10) for _ in procs)
    client, name = MlflowClient(mlflow_uri), cfg.registry.model_name
    assert client.get_model_version_by_alias(name, CHAMPION).version == versions["better"]


def cli(*args: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "jobs.service", *args],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_export_hf_and_generate_from_registry(dataset, models, mlflow_uri, tmp_path):
    cfg = make_cfg(tmp_path)
    ctx, data, reader = make_context(cfg, dataset)
    model = models[1]
    out, _ = register(ctx, data, reader, model, "one")
    name = cfg.registry.model_name
    env = {"MLFLOW_TRACKING_URI": mlflow_uri}

    scratch = tmp_path / "tmpdir"  # the commands' temporary folder: nothing may stay there
    scratch.mkdir()
    folder = tmp_path / "export"
    cli("export-hf", "--model", f"models:/{name}@{CHAMPION}", "--out", str(folder),
        env={**env, "TMPDIR": str(scratch)})  # fmt: skip
    assert list(scratch.iterdir()) == []
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".bin"))]
    gen_cfg = json.loads((folder / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == reader.eos_token_id

    # Hugging Face loads it as Mixtral (safetensors only) and agrees with our model's logits.
    from transformers import AutoTokenizer, MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    ids = torch.from_numpy(reader.read_shard("val", 0)[:2, :16].astype(np.int64))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    text = "the router sends every token"
    assert (
        AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
        == reader.load_tokenizer().encode(text).ids
    )

    prompt = "the router sends"
    printed = cli(
        "generate", "--model", f"models:/{name}/{out.outputs['version']}", "--prompt", prompt,
        "--max-new-tokens", "6", env={**env, "TMPDIR": str(scratch)},
    ).rstrip("\n")  # fmt: skip
    assert list(scratch.iterdir()) == []
    from jobs.service.hf_folder import generate_text, load_hf_folder

    assert printed == prompt + generate_text(load_hf_folder(folder), prompt, 6)
    assert len(printed) > len(prompt)


def test_gate_modes_and_margin():
    from types import SimpleNamespace

    from jobs.service.config import RegistryConfig
    from jobs.service.registry import decide

    champ = SimpleNamespace(version="3", tags={})

    def at(loss):
        return lambda mv: (loss, "recorded")

    loss = RegistryConfig()
    assert decide(loss, "val/loss", 2.0, None, at(9.0)).promote
    assert decide(loss, "val/loss", 2.0, champ, at(2.5)).promote
    assert not decide(loss, "val/loss", 2.5, champ, at(2.5)).promote  # a tie keeps the champion
    margin = RegistryConfig(gate_min_delta=0.6)
    assert not decide(margin, "val/loss", 2.0, champ, at(2.5)).promote
    assert decide(margin, "val/loss", 1.8, champ, at(2.5)).promote
    never, always = RegistryConfig(gate="never"), RegistryConfig(gate="always")
    assert not decide(never, "val/loss", 0.1, None, at(9.0)).promote
    assert decide(always, "val/loss", 9.0, champ, at(0.1)).promote
    kept = decide(loss, "val/loss", 0.1, champ, lambda mv: (None, "it uses another tokenizer"))
    assert not kept.promote and "another tokenizer" in kept.reason
