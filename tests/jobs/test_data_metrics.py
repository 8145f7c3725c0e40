"""The prepare step's MLflow metrics: near duplicates and each mixture source's tokens."""

from __future__ import annotations

from jobs.service.steps.data import _data_metrics


def manifest(**extra) -> dict:
    splits = {s: {"tokens": 10, "rows": 1} for s in ("train", "val")}
    base = {"splits": splits, "quarantine": {"total": 3}, "duplicates_removed": 1}
    return {**base, **extra}


def test_near_duplicates_and_sources_become_metrics():
    m = manifest(
        near_duplicates={"removed": 2},
        mixture=[{"name": "web", "tokens": 15}, {"name": "code", "tokens": 5}],
    )
    metrics = _data_metrics(m, 1.5)
    assert metrics["data/near_duplicates_removed"] == 2
    assert metrics["data/web/tokens"] == 15 and metrics["data/code/tokens"] == 5


def test_a_single_source_dataset_without_near_dedup_reads_zero():
    metrics = _data_metrics(manifest(near_duplicates=None), 1.0)
    assert metrics["data/near_duplicates_removed"] == 0
    assert not [k for k in metrics if k.endswith("/tokens") and k.count("/") == 2]
