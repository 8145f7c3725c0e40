"""``run_pipeline``: prepare -> train -> evaluate -> register as one tracked, cached run.

One MLflow parent run per pipeline run and one nested run per step (training
opens its own under the same parent). A step whose committed output exists
is skipped and its run tagged ``moe.cache_hit=true``, so rerunning an
unchanged config does no work; ``force`` names steps to redo anyway.
Lineage (dataset fingerprint and manifest, tokenizer hash, checkpoint, config
hash, git commit) is tagged on the parent run and on the model version.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jobs.errors import JobError
from jobs.service import steps
from jobs.service.lineage import git_commit, run_config_hash
from jobs.service.steps.base import Context, StepOutcome, join_job_cluster
from jobs.service.steps.cache import STEPS, StepCache
from jobs.service.submit import SUBMISSION_ENV
from jobs.service.tracking import PIPELINE_TAG, SUBMISSION_TAG, Runs, log_json
from jobs.tracking import Tracker


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
    steps: list[StepOutcome] = field(default_factory=list)

    @property
    def cache_hits(self) -> dict[str, bool]:
        return {s.name: s.cache_hit for s in self.steps}


def check_force(force: Iterable[str]) -> frozenset[str]:
    force = frozenset(force)
    unknown = sorted(force - set(STEPS))
    if unknown:
        raise JobError(f"--force {unknown[0]}: expected one of {', '.join(STEPS)}")
    return force


def run_pipeline(cfg, force: Iterable[str] = (), run_name: str | None = None) -> PipelineResult:
    ctx = Context(
        cfg, Runs(cfg), StepCache(cfg.storage.root, cfg.data.s3), force=check_force(force)
    )
    ctx.lineage = {"lineage.config_hash": run_config_hash(cfg), "lineage.git_commit": git_commit()}
    join_job_cluster()
    tags = {PIPELINE_TAG: "true", **ctx.lineage}
    if os.environ.get(SUBMISSION_ENV):
        tags[SUBMISSION_TAG] = os.environ[SUBMISSION_ENV]
    parent = ctx.runs.start(run_name or f"pipeline-{ctx.lineage['lineage.config_hash'][:8]}", tags)
    ctx.parent_run_id = parent.run_id
    try:
        result = _run_steps(ctx, parent)
    except BaseException:
        parent.close("FAILED")
        raise
    parent.close()
    return result


def _run_steps(ctx: Context, parent: Tracker) -> PipelineResult:
    parent.log_params(ctx.cfg.model_dump(mode="json"))
    log_json(parent, "config.json", ctx.cfg.model_dump(mode="json"))
    data = steps.prepare(ctx)
    trained = steps.train(ctx, data)
    ctx.lineage["lineage.checkpoint_uri"] = trained.outputs["checkpoint_uri"]
    evaluated = steps.evaluate(ctx, data, trained)
    registered = steps.register(ctx, data, evaluated)
    out = registered.outputs
    model_uri = f"models:/{out['name']}/{out['version']}"
    parent.set_tags(
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
    parent.log({k: v for k, v in metrics.items() if _is_number(v)}, step=0)
    return PipelineResult(
        model_uri=model_uri,
        model_version=out["version"],
        became_champion=out["became_champion"] == "true",
        parent_run_id=parent.run_id,
        dataset_uri=data.outputs["dataset_uri"],
        checkpoint_uri=trained.outputs["checkpoint_uri"],
        train_run_id=trained.run_id,
        metrics=metrics,
        samples=evaluated.outputs.get("samples", []),
        steps=[data, trained, evaluated, registered],
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and v == v
