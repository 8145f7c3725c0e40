"""The evaluate and register steps on their own, for a checkpoint the user names."""

from __future__ import annotations

import hashlib

from jobs.errors import JobError
from jobs.service.evaluate import EvalResult, evaluate_model
from jobs.service.lineage import dataset_lineage, git_commit, run_config_hash
from jobs.service.steps.base import Context, StepOutcome, join_job_cluster
from jobs.service.steps.cache import StepCache
from jobs.service.steps.model import eval_sets, evaluate, log_eval, register
from jobs.service.tracking import Runs
from jobs.train.init_from import confine_checkpoint


def _context(cfg) -> Context:
    ctx = Context(cfg, Runs(cfg), StepCache(cfg.storage.root, cfg.data.s3))
    ctx.lineage = {"lineage.config_hash": run_config_hash(cfg), "lineage.git_commit": git_commit()}
    return ctx


def _dataset(ctx: Context, dataset: str | None, checkpoint: str | None) -> StepOutcome:
    """The named dataset, else the one the checkpoint was trained on, else ``data.*`` prepared."""
    from pipeline.reader import DatasetReader

    if dataset is None and checkpoint is not None:
        from jobs.train.checkpoint import load_checkpoint_model

        dataset = load_checkpoint_model(checkpoint)[2].get("dataset_uri") or None
        if dataset is not None:  # read from the checkpoint: confined like any stored path
            dataset = confine_checkpoint(
                ctx.cfg.storage.root, dataset, f"{checkpoint}: dataset_uri"
            )
    if dataset is None:
        from pipeline.prepare import prepare

        join_job_cluster()
        dataset = prepare(ctx.cfg.data, ctx.cfg.storage.root).uri
    reader = DatasetReader(dataset, ctx.cfg.data.s3)
    ctx.lineage.update(dataset_lineage(reader.manifest, reader.uri))
    outputs = {"dataset_uri": reader.uri, "manifest": reader.manifest}
    return StepOutcome("prepare", True, reader.fingerprint, None, outputs)


def _trained(ctx: Context, checkpoint: str) -> StepOutcome:
    ctx.lineage["lineage.checkpoint_uri"] = checkpoint
    fp = hashlib.sha256(checkpoint.encode()).hexdigest()[:16]
    return StepOutcome("train", True, fp, None, {"checkpoint_uri": checkpoint, "metrics": {}})


def evaluate_only(cfg, checkpoint: str | None = None, model: str | None = None, dataset=None):
    """(EvalResult, MLflow run id) for a checkpoint or a registered model."""
    if (checkpoint is None) == (model is None):
        raise JobError("evaluate: pass exactly one of --checkpoint or --model")
    ctx = _context(cfg)
    data = _dataset(ctx, dataset, checkpoint)
    if checkpoint is not None:
        out = evaluate(ctx, data, _trained(ctx, checkpoint))
        o = out.outputs
        return EvalResult(o["metrics"], [], o["samples"], o["eval_data"]), out.run_id
    return _evaluate_registered(ctx, data, model)


def _evaluate_registered(ctx: Context, data: StepOutcome, model: str):
    from jobs.service.hf_folder import load_model
    from pipeline.reader import DatasetReader

    loaded = load_model(model, ctx.runs.tracking_uri)
    theirs = loaded.tokenizer_sha256
    ours = data.outputs["manifest"]["tokenizer"]["sha256"]
    if theirs != ours:
        raise JobError(f"evaluate: {model} has another tokenizer than dataset {data.fingerprint}")
    reader = DatasetReader(data.outputs["dataset_uri"], ctx.cfg.data.s3)
    sets = eval_sets(ctx, reader, loaded.tokenizer)
    with ctx.runs.step("evaluate", None, {"moe.model": model, **ctx.lineage}) as run:
        result = evaluate_model(
            loaded.model, loaded.tokenizer, sets, ctx.cfg.evaluate, reader.eos_token_id
        )
        log_eval(run, result)
    return result, run.run_id


def register_only(cfg, checkpoint: str, dataset: str | None = None) -> StepOutcome:
    ctx = _context(cfg)
    data = _dataset(ctx, dataset, checkpoint)
    evaluated = evaluate(ctx, data, _trained(ctx, checkpoint))
    return register(ctx, data, evaluated)
