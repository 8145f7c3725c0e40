"""``run_pipeline``: prepare -> train -> evaluate -> register as one tracked, cached run.

One MLflow parent run per pipeline run and one nested run per stage (training
opens its own under the same parent). A stage whose committed output exists
is skipped and its run tagged ``moe.cache_hit=true``, so rerunning an
unchanged config does no work; ``force`` names stages to redo anyway.
Lineage (dataset fingerprint and manifest, tokenizer hash, checkpoint, config
hash, git commit) is tagged on the parent run and on the model version.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jobs.errors import JobError
from jobs.service.lineage import git_commit, run_config_hash
from jobs.service.steps.base import Context, StageOutcome, join_job_cluster
from jobs.service.steps.cache import STAGES, StageCache
from jobs.service.steps.data import prepare_stage, train_stage
from jobs.service.steps.model import evaluate_stage, register_stage
from jobs.service.submit import SUBMISSION_ENV
from jobs.service.tracking import PIPELINE_TAG, SUBMISSION_TAG, Runs


@dataclass
class PipelineResult:
    model_uri: str  # models:/NAME/VERSION
    model_version: str
    became_champion: bool
    parent_run_id: str
    dataset_uri: str
    checkpoint_uri: str
    train_run_id: str | None
    metrics: dict[str, float]
    samples: list[dict[str, str]]
    stages: list[StageOutcome] = field(default_factory=list)

    @property
    def cache_hits(self) -> dict[str, bool]:
        return {s.name: s.cache_hit for s in self.stages}


def check_force(force: Iterable[str]) -> frozenset[str]:
    force = frozenset(force)
    unknown = sorted(force - set(STAGES))
    if unknown:
        raise JobError(f"--force {unknown[0]}: expected one of {', '.join(STAGES)}")
    return force


def run_pipeline(cfg, force: Iterable[str] = (), run_name: str | None = None) -> PipelineResult:
    ctx = Context(
        cfg, Runs(cfg), StageCache(cfg.storage.root, cfg.data.s3), force=check_force(force)
    )
    ctx.lineage = {"lineage.config_hash": run_config_hash(cfg), "lineage.git_commit": git_commit()}
    join_job_cluster()
    tags = {PIPELINE_TAG: "true", **ctx.lineage}
    if os.environ.get(SUBMISSION_ENV):
        tags[SUBMISSION_TAG] = os.environ[SUBMISSION_ENV]
    ctx.parent_run_id = ctx.runs.start(
        run_name or f"pipeline-{ctx.lineage['lineage.config_hash'][:8]}", tags
    )
    try:
        result = _stages(ctx)
    except BaseException:
        ctx.runs.end(ctx.parent_run_id, ok=False)
        raise
    ctx.runs.end(ctx.parent_run_id)
    return result


def _stages(ctx: Context) -> PipelineResult:
    runs, parent = ctx.runs, ctx.parent_run_id
    runs.log_params(parent, ctx.cfg.model_dump(mode="json"))
    runs.log_json(parent, "config.json", ctx.cfg.model_dump(mode="json"))
    data = prepare_stage(ctx)
    trained = train_stage(ctx, data)
    ctx.lineage["lineage.checkpoint_uri"] = trained.outputs["checkpoint_uri"]
    evaluated = evaluate_stage(ctx, data, trained)
    registered = register_stage(ctx, data, evaluated)
    out = registered.outputs
    model_uri = f"models:/{out['name']}/{out['version']}"
    runs.set_tags(
        parent,
        {
            **ctx.lineage,
            "moe.model_uri": model_uri,
            "moe.model_version": out["version"],
            "moe.became_champion": out["became_champion"],
            "moe.cache_hits": ",".join(
                s.name for s in (data, trained, evaluated, registered) if s.cache_hit
            ),
        },
    )
    metrics = {**trained.outputs["metrics"], **evaluated.outputs["metrics"]}
    runs.log_metrics(parent, {k: v for k, v in metrics.items() if _is_number(v)})
    return PipelineResult(
        model_uri=model_uri,
        model_version=out["version"],
        became_champion=out["became_champion"] == "true",
        parent_run_id=parent,
        dataset_uri=data.outputs["dataset_uri"],
        checkpoint_uri=trained.outputs["checkpoint_uri"],
        train_run_id=trained.run_id,
        metrics=metrics,
        samples=evaluated.outputs.get("samples", []),
        stages=[data, trained, evaluated, registered],
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and v == v
