"""MLflow runs of a pipeline: one parent run, one nested run per step.

Runs are made with ``MlflowClient`` (explicit run ids, no fluent "active run"),
so the training driver, which opens its own nested run under the same parent
in the same process, never collides with a run left active here.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.auth import check_mlflow_credentials
from jobs.tracking import flatten_params, resolve_tracking_uri
from pipeline.redaction import redact

PIPELINE_TAG = "moe.pipeline"
SUBMISSION_TAG = "moe.submission_id"
# The tag still says "stage", its name before the DAG's steps were called steps: runs
# already stored, and searches for them, keep matching.
STEP_TAG = "moe.stage"
CACHE_HIT_TAG = "moe.cache_hit"
_MAX_PARAM_LEN = 6000


def make_client(cfg):
    """The pipeline's MLflow client; half a pair of credentials is refused here, before any work."""
    from mlflow import MlflowClient

    check_mlflow_credentials()
    uri = resolve_tracking_uri(cfg.tracking.uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created by someone else in between
        return client.get_experiment_by_name(name).experiment_id


class Runs:
    """Creates and ends the pipeline's runs; tags and params pass through ``redact``."""

    def __init__(self, cfg):
        self.client = make_client(cfg)
        self.tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
        self.experiment_id = experiment_id(self.client, cfg.tracking.experiment)

    def start(self, name: str, tags: dict[str, Any], parent_run_id: str | None = None) -> str:
        tags = {k: str(v) for k, v in redact(dict(tags)).items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def end(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    @contextmanager
    def step(self, name: str, parent_run_id: str | None, tags: dict[str, Any] | None = None):
        run_id = self.start(name, {STEP_TAG: name, **(tags or {})}, parent_run_id)
        try:
            yield run_id
        except BaseException:
            self.end(run_id, ok=False)
            raise
        self.end(run_id)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in redact(dict(tags)).items():
            self.client.set_tag(run_id, key, str(value))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(redact(params))
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_json(self, run_id: str, name: str, payload: Any, artifact_path: str | None = None):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(redact(payload), indent=2, default=str))
            self.client.log_artifact(run_id, str(path), artifact_path)


def find_pipeline_run(cfg, submission_id: str):
    """The pipeline (parent) run a submitted job made, found by its submission-id tag."""
    client = make_client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{SUBMISSION_TAG}` = '{submission_id}' and "
        f"tags.`{PIPELINE_TAG}` = 'true'",
        max_results=1,
    )
    return runs[0] if runs else None
