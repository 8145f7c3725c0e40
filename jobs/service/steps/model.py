"""The evaluate and register steps: score a checkpoint, publish it, gate the champion."""

from __future__ import annotations

import tempfile
from typing import Any

from jobs.service import registry as reg
from jobs.service.evaluate import (
    EvalResult,
    EvalSet,
    evaluate_model,
    heldout_set,
    loss_on,
    val_set,
    write_report,
)
from jobs.service.lineage import stable_hash
from jobs.service.steps.base import Context, StepOutcome
from jobs.service.tracking import CACHE_HIT_TAG
from jobs.tracking import Tracker
from pipeline.locks import storage_lock
from pipeline.storage import join


def eval_sets(ctx: Context, reader, tokenizer) -> list[EvalSet]:
    cfg = ctx.cfg
    sets = [val_set(reader, cfg.evaluate)]
    if cfg.evaluate.inputs:
        eos = reader.eos_token_id
        sets.append(heldout_set(cfg.evaluate.inputs, cfg.data, tokenizer, eos, cfg.evaluate))
    return [s for s in sets if s is not None]


def heldout_listing(ctx: Context) -> list[dict[str, Any]]:
    from pipeline.sources import list_sources

    inputs = ctx.cfg.evaluate.inputs
    return [s.listing_entry() for s in list_sources(inputs, ctx.cfg.data.s3)] if inputs else []


def evaluate(ctx: Context, data: StepOutcome, trained: StepOutcome) -> StepOutcome:
    checkpoint = trained.outputs["checkpoint_uri"]
    fp = stable_hash(
        {
            "checkpoint": checkpoint,
            "dataset": data.fingerprint,
            "evaluate": ctx.cfg.evaluate.model_dump(mode="json"),
            "heldout": heldout_listing(ctx),
        }
    )
    hit = None if "evaluate" in ctx.force else ctx.cache.lookup("evaluate", fp)
    if hit is not None:
        tags = {CACHE_HIT_TAG: "true", "moe.cached_from_run": hit["run_id"]}
        with ctx.runs.step("evaluate", ctx.parent_run_id, tags) as run:
            run.log(hit["metrics"], step=0)
        return StepOutcome("evaluate", True, fp, hit["run_id"], hit)
    from jobs.train.checkpoint import load_checkpoint_model
    from pipeline.reader import DatasetReader

    reader = DatasetReader(data.outputs["dataset_uri"], ctx.cfg.data.s3)
    tokenizer = reader.load_tokenizer()
    with ctx.runs.step("evaluate", ctx.parent_run_id, {CACHE_HIT_TAG: "false"}) as run:
        model, _, _ = load_checkpoint_model(checkpoint)
        result = evaluate_model(
            model, tokenizer, eval_sets(ctx, reader, tokenizer), ctx.cfg.evaluate,
            reader.eos_token_id,
        )  # fmt: skip
        log_eval(run, result)
    record = {
        "run_id": run.run_id,
        "metrics": result.metrics,
        "eval_data": result.eval_data,
        "samples": result.samples,
    }
    ctx.cache.commit("evaluate", fp, record)
    return StepOutcome("evaluate", False, fp, run.run_id, {**record, "model": model})


def log_eval(run: Tracker, result: EvalResult) -> None:
    run.log(result.metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_report(result, tmp):
            run.log_artifact(path, "eval")


def register(ctx: Context, data: StepOutcome, evaluated: StepOutcome) -> StepOutcome:
    cfg = ctx.cfg
    name = cfg.registry.model_name
    fp = stable_hash({"evaluate": evaluated.fingerprint, "model_name": name})
    found = None if "register" in ctx.force else reg.find_version(ctx.runs.client, name, fp)
    if found is not None:
        tags = {CACHE_HIT_TAG: "true", "moe.model_version": found.version}
        with ctx.runs.step("register", ctx.parent_run_id, tags) as run:
            pass
        champion = found.tags.get(reg.TAG_BECAME_CHAMPION, "false")
        outputs = {"name": name, "version": str(found.version), "became_champion": champion}
        return StepOutcome("register", True, fp, run.run_id, outputs)
    with ctx.runs.step("register", ctx.parent_run_id, {CACHE_HIT_TAG: "false"}) as run:
        outputs = _register(ctx, run, fp, data, evaluated)
    return StepOutcome("register", False, fp, run.run_id, outputs)


def _register(ctx: Context, run: Tracker, fp: str, data, evaluated) -> dict[str, Any]:
    from pipeline.reader import DatasetReader

    cfg = ctx.cfg
    name, client = cfg.registry.model_name, ctx.runs.client
    metric, new_loss = EvalResult(evaluated.outputs["metrics"], [], []).gate_loss(
        cfg.registry.gate_metric
    )
    eval_data = evaluated.outputs["eval_data"]
    reader = DatasetReader(data.outputs["dataset_uri"], cfg.data.s3)
    model = evaluated.outputs.get("model") or _checkpoint_model(ctx)
    tags = {
        **ctx.lineage,
        reg.TAG_FINGERPRINT: fp,
        reg.TAG_GATE_METRIC: metric,
        reg.TAG_GATE_LOSS: repr(new_loss),
        **{f"{reg.TAG_EVAL_DATA}.{k}": v for k, v in eval_data.items()},
        **{f"metric.{k}": f"{v:.6g}" for k, v in evaluated.outputs["metrics"].items()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = _hf_folder(model, reader, tmp)
        mv = reg.publish_version(client, run.run_id, folder, name, tags)
    set_name = metric.split("/")[0]
    # Check-then-set: two registers at once could both beat the old champion and the worse
    # one move the alias last. One gate at a time per storage root, and a re-check after.
    with storage_lock(join(cfg.storage.root, "registry", f"{name}.champion.lock"), cfg.data.s3):
        client.set_registered_model_alias(name, reg.CANDIDATE, mv.version)
        champion = reg.version_by_alias(client, name, reg.CHAMPION)
        scorer = _champion_scorer(ctx, reader, metric, eval_data)
        decision = reg.decide(cfg.registry, metric, new_loss, champion, scorer)
        reg.apply_decision(client, name, mv.version, decision)
        if decision.promote and cfg.registry.gate == "loss":
            reg.recheck_champion(client, name, decision, eval_data.get(set_name), set_name)
    run.set_tags({**decision.as_tags(), "moe.model_version": mv.version})
    run.log(decision.as_metrics(), step=0)
    return {
        "name": name,
        "version": str(mv.version),
        "became_champion": str(decision.promote).lower(),
        "decision": decision,
    }


def _checkpoint_model(ctx: Context):
    from jobs.train.checkpoint import load_checkpoint_model

    return load_checkpoint_model(ctx.lineage["lineage.checkpoint_uri"])[0]


def _hf_folder(model, reader, tmp: str):
    """The registered folder, with the dataset's tokenizer file copied byte for byte."""
    from jobs.service.hf_folder import write_hf_folder
    from pipeline.storage import filesystem, join

    fs, path = filesystem(join(reader.uri, reader.manifest["tokenizer"]["file"]), reader.s3)
    local_tok = f"{tmp}/tokenizer.json"
    fs.get(path, local_tok)
    special = dict(reader.manifest.get("special_tokens", {}))
    return write_hf_folder(model, local_tok, f"{tmp}/model", special)


def _champion_scorer(ctx: Context, reader, metric: str, eval_data: dict[str, str]):
    """The champion's loss on the same eval rows as the new version (see ``registry.decide``)."""
    set_name = metric.split("/")[0]
    ours_tok = ctx.lineage.get("lineage.tokenizer_sha256", "")

    def score(champion) -> tuple[float | None, str]:
        tags = champion.tags
        recorded = tags.get(f"{reg.TAG_EVAL_DATA}.{set_name}")
        if tags.get(reg.TAG_GATE_METRIC) == metric and recorded == eval_data.get(set_name):
            return float(tags[reg.TAG_GATE_LOSS]), "recorded on the same eval data"
        if tags.get("lineage.tokenizer_sha256") != ours_tok:
            return None, "it uses another tokenizer, so per-token losses are not comparable"
        return _rescore(ctx, reader, champion, set_name), "re-evaluated on the same eval data"

    return score


def _rescore(ctx: Context, reader, champion, set_name: str) -> float:
    from jobs.service.hf_folder import load_model

    name = ctx.cfg.registry.model_name
    loaded = load_model(f"models:/{name}/{champion.version}", ctx.runs.tracking_uri)
    sets = {s.name: s for s in eval_sets(ctx, reader, loaded.tokenizer)}
    return loss_on(loaded.model, sets[set_name].rows, ctx.cfg.evaluate.batch_size)[0]["loss"]
