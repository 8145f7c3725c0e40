"""The pipeline's prepare step: a new file extends the dataset, ``--force prepare`` rebuilds."""

from __future__ import annotations

import random
import uuid

import pytest

from jobs.config import RootConfig
from jobs.service import steps
from jobs.service.steps.base import Context
from jobs.service.steps.cache import StepCache
from jobs.service.tracking import CACHE_HIT_TAG, Runs
from jobs.settings import build
from tests.pipeline.conftest import document, write_jsonl

pytestmark = pytest.mark.slow


def test_prepare_step_extends_then_force_rebuilds(ray_local, mlflow_uri, tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": document(rng)} for _ in range(24)])
    data = dict(name="svc", inputs=[str(corpus)], seq_len=31, vocab_size=300, shard_rows=8,
                val_fraction=0.25, batch_size=4, num_workers=1)  # fmt: skip
    cfg = build(
        RootConfig,
        {
            "storage": {"root": str(tmp_path / "out")},
            "tracking": {"uri": mlflow_uri, "experiment": f"prep-{uuid.uuid4().hex[:6]}"},
            "data": data,
        },
    )
    ctx = Context(cfg, Runs(cfg), StepCache(cfg.storage.root))
    first = steps.prepare(ctx)
    write_jsonl(corpus / "b.jsonl", [{"text": document(rng)} for _ in range(6)])
    second = steps.prepare(ctx)
    inc = second.outputs["manifest"]["incremental"]
    assert not second.cache_hit and inc["base"] == first.fingerprint
    assert inc["records_read"] == 6
    assert steps.prepare(ctx).cache_hit

    forced = steps.prepare(Context(cfg, ctx.runs, ctx.cache, force=frozenset({"prepare"})))
    assert not forced.cache_hit and "incremental" not in forced.outputs["manifest"]
    assert forced.outputs["manifest"]["records_read"] == 30
    tags = ctx.runs.client.get_run(forced.run_id).data.tags
    assert tags[CACHE_HIT_TAG] == "false"
    assert tags["lineage.dataset_fingerprint"] == forced.fingerprint != second.fingerprint
