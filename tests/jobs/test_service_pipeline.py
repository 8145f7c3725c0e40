"""The demo-size pipeline end to end against a real ``mlflow server``, then a rerun that is
all cache hits."""

from __future__ import annotations

import copy

import pytest

from jobs.config import RootConfig
from jobs.errors import JobError
from jobs.service.dag import check_force, run_pipeline
from jobs.service.demo import demo_tree, loss_curve
from jobs.service.registry import CANDIDATE, CHAMPION
from jobs.service.submit import SUBMISSION_ENV
from jobs.service.tracking import find_pipeline_run
from jobs.settings import apply_overrides, build

# The demo's tree with fewer documents and steps: same corpus, preset and steps.
SMALLER = [
    "data.max_documents=120",
    "train.max_steps=12",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.eval_every=12",
    "train.checkpoint_every=12",
    "evaluate.max_batches=2",
    "evaluate.max_new_tokens=4",
]


def test_unknown_force_step_is_one_line():
    with pytest.raises(JobError, match="--force trian: expected one of prepare, train"):
        check_force(["trian"])


@pytest.mark.slow
def test_pipeline_end_to_end_then_all_cache_hits(ray_local, mlflow_uri, tmp_path, monkeypatch):
    tree = apply_overrides(demo_tree(), SMALLER)
    tree["storage"] = {"root": str(tmp_path / "outputs")}
    tree["tracking"] = {"uri": mlflow_uri, "experiment": "e2e"}
    tree["registry"] = {"model_name": "e2e-model"}
    cfg = build(RootConfig, tree)
    monkeypatch.setenv(SUBMISSION_ENV, "e2e-submission-1")

    first = run_pipeline(cfg)
    assert first.model_uri == "models:/e2e-model/1"
    assert not any(first.cache_hits.values()), first.cache_hits
    assert first.became_champion

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(first.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{first.parent_run_id}'",
    )
    stages = sorted(c.data.tags.get("moe.stage", "train") for c in children)
    assert stages == ["evaluate", "prepare", "register", "train"]
    lineage = {k: v for k, v in parent.data.tags.items() if k.startswith("lineage.")}
    assert lineage["lineage.checkpoint_uri"] == first.checkpoint_uri
    assert lineage["lineage.dataset_fingerprint"] in first.dataset_uri
    assert {"lineage.config_hash", "lineage.git_commit", "lineage.tokenizer_sha256"} <= set(lineage)
    version = client.get_model_version("e2e-model", "1")
    assert {k: version.tags[k] for k in lineage} == lineage
    assert set(version.aliases) == {CANDIDATE, CHAMPION}
    assert "val/loss" in first.metrics and "val/perplexity" in first.metrics

    curve = loss_curve(client, first.train_run_id)
    assert len(curve) >= 4 and curve[-1][1] < curve[0][1] - 0.5, curve

    # The scheduler finds a submitted run's pipeline run by its submission id.
    found = find_pipeline_run(cfg, "e2e-submission-1")
    assert found.info.run_id == first.parent_run_id
    assert found.data.tags["moe.model_version"] == "1"

    second = run_pipeline(cfg)
    assert all(second.cache_hits.values()), second.cache_hits
    assert second.model_uri == first.model_uri and second.parent_run_id != first.parent_run_id
    assert second.checkpoint_uri == first.checkpoint_uri
    assert len(client.search_model_versions("name = 'e2e-model'")) == 1
    hits = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{second.parent_run_id}'",
    )
    assert sorted(r.data.tags["moe.cache_hit"] for r in hits) == ["true"] * 4

    # train.init_from=champion: a new training run that starts from the champion's weights.
    more = apply_overrides(copy.deepcopy(tree), ["train.init_from=champion", "train.max_steps=4"])
    third = run_pipeline(build(RootConfig, more))
    assert third.cache_hits == {
        "prepare": True,
        "train": False,
        "evaluate": False,
        "register": False,
    }
    assert third.model_uri == "models:/e2e-model/2"
    resumed = loss_curve(client, third.train_run_id)
    assert resumed[0][1] < curve[0][1] - 0.5, (resumed, curve)
