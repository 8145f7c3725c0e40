"""The data and training steps of the DAG, each skipped when its committed output exists."""

from __future__ import annotations

import time
from typing import Any

from jobs.errors import JobError
from jobs.service.lineage import dataset_lineage, stable_hash
from jobs.service.steps.base import Context, StepOutcome
from jobs.service.tracking import CACHE_HIT_TAG
from jobs.train.init_from import confine_checkpoint
from pipeline.locks import storage_lock


def prepare(ctx: Context) -> StepOutcome:
    from pipeline.prepare import prepare as prepare_dataset

    cfg = ctx.cfg
    with ctx.runs.step("prepare", ctx.parent_run_id) as run:
        result = prepare_dataset(cfg.data, cfg.storage.root, force="prepare" in ctx.force)
        manifest = result.manifest
        ctx.lineage.update(dataset_lineage(manifest, result.uri))
        run.set_tags({CACHE_HIT_TAG: str(result.cache_hit).lower(), **ctx.lineage})
        run.log(_data_metrics(manifest, result.seconds), step=0)
    outputs = {"dataset_uri": result.uri, "manifest": manifest}
    return StepOutcome("prepare", result.cache_hit, manifest["fingerprint"], run.run_id, outputs)


def _data_metrics(manifest: dict[str, Any], seconds: float) -> dict[str, float]:
    splits = manifest.get("splits", {})
    return {
        **{f"data/{s}_{k}": v[k] for s, v in splits.items() for k in ("tokens", "rows")},
        "data/quarantined": manifest.get("quarantine", {}).get("total", 0),
        "data/duplicates_removed": manifest.get("duplicates_removed", 0),
        "data/near_duplicates_removed": (manifest.get("near_duplicates") or {}).get("removed", 0),
        **{f"data/{m['name']}/tokens": m["tokens"] for m in manifest.get("mixture") or []},
        "data/seconds": seconds,
    }


def resolve_init(ctx: Context, manifest: dict[str, Any]) -> tuple[str | None, str | None]:
    """``train.init_from`` as (checkpoint the trainer loads, identity for the fingerprint).

    ``champion`` resolves to the training checkpoint the current champion was
    registered from (its ``lineage.checkpoint_uri``); with no champion yet,
    training starts from scratch. ``upcycle:PATH`` (a dense HF folder inside the
    storage root) is checked against ``model.*`` here, before any worker starts,
    and identified by its files' hash.
    """
    from jobs.service.registry import CHAMPION, version_by_alias
    from jobs.train import upcycling

    init = getattr(ctx.cfg.train, "init_from", None)
    dense = upcycling.upcycle_source(init)
    if dense is not None:
        path = confine_checkpoint(ctx.cfg.storage.root, dense, relative_to="root")
        upcycling.check_fits(path, ctx.cfg.model.build(manifest.get("vocab_size")))
        return upcycling.PREFIX + path, upcycling.source_identity(path)
    if not init or init != CHAMPION:
        return init or None, init or None
    name = ctx.cfg.registry.model_name
    mv = version_by_alias(ctx.runs.client, name, CHAMPION)
    if mv is None:
        return None, None
    theirs = mv.tags.get("lineage.tokenizer_sha256")
    ours = manifest.get("tokenizer", {}).get("sha256")
    if theirs and ours and theirs != ours:
        raise JobError(
            f"train.init_from: champion {name} v{mv.version} was trained with tokenizer "
            f"{theirs[:12]}, the dataset has {ours[:12]}"
        )
    checkpoint = mv.tags.get("lineage.checkpoint_uri", "")
    if checkpoint:  # a tag any EDIT user of the registry can change
        checkpoint = confine_checkpoint(
            ctx.cfg.storage.root, checkpoint,
            f"train.init_from: champion {name} v{mv.version}'s lineage.checkpoint_uri",
        )  # fmt: skip
    if not checkpoint or not ctx.cache.exists(checkpoint):
        raise JobError(
            f"train.init_from: the checkpoint of champion {name} v{mv.version} is gone "
            f"({checkpoint or 'not recorded'})"
        )
    return checkpoint, f"models:/{name}/{mv.version}"


def _checkpoint_exists(ctx: Context, record: dict[str, Any]) -> bool:
    uri = confine_checkpoint(ctx.cfg.storage.root, record["checkpoint_uri"], "train step record")
    return ctx.cache.exists(uri)


def train(ctx: Context, data: StepOutcome) -> StepOutcome:
    cfg = ctx.cfg
    init_path, init_id = resolve_init(ctx, data.outputs["manifest"])
    if init_id and init_id.startswith("upcycle:"):
        ctx.lineage["lineage.upcycled_from"] = init_id
    elif init_id:  # a checkpoint URI, or the champion's model URI
        ctx.lineage["lineage.init_from"] = init_id
    fp = stable_hash(
        {
            "dataset": data.fingerprint,
            "model": cfg.model.build(data.outputs["manifest"]["vocab_size"]).to_dict(),
            "train": cfg.train.model_dump(mode="json"),
            "init_from": init_id,
        }
    )
    # Two pipeline runs of one config would train the same run at once: the second waits,
    # then finds the first one's record.
    with storage_lock(ctx.cache.uri("train", fp) + ".lock", cfg.data.s3):
        return _train_or_reuse(ctx, data, fp, init_path, init_id)


def _train_or_reuse(
    ctx: Context, data: StepOutcome, fp: str, init_path: str | None, init_id: str | None
) -> StepOutcome:
    from jobs.train.driver import train as train_model

    cfg = ctx.cfg
    hit = None
    if "train" not in ctx.force:
        hit = ctx.cache.lookup("train", fp, lambda r: _checkpoint_exists(ctx, r))
    if hit is not None:
        tags = {CACHE_HIT_TAG: "true", "moe.cached_from_run": hit["mlflow_run_id"]}
        with ctx.runs.step("train", ctx.parent_run_id, tags) as run:
            run.log(hit["metrics"], step=hit["steps"])
        return StepOutcome("train", True, fp, hit["mlflow_run_id"], hit)
    # A forced rerun gets a fresh run name, so the trainer does not resume the old one.
    suffix = f"-{int(time.time())}" if "train" in ctx.force else ""
    result = train_model(
        cfg,
        data.outputs["dataset_uri"],
        run_name=f"train-{fp}{suffix}",
        parent_run_id=ctx.parent_run_id,
        init_from=init_path,
    )
    record = {
        "checkpoint_uri": result.checkpoint_uri,
        "mlflow_run_id": result.mlflow_run_id,
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "steps": int(result.steps),
        "init_from": init_id,
    }
    ctx.cache.commit("train", fp, record)
    return StepOutcome("train", False, fp, result.mlflow_run_id, record)
