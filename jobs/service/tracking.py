"""MLflow runs of a pipeline: one parent run, one nested run per step, each a ``Tracker``.

The runs are ``jobs.tracking.ClientTracker``: explicit run ids, written at once,
the same interface the trainer's tracker has.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.auth import check_mlflow_credentials
from jobs.tracking import ClientTracker, Tracker, resolve_tracking_uri
from jobs.tracking.delivery import experiment_id
from pipeline.redaction import redact

PIPELINE_TAG = "moe.pipeline"
SUBMISSION_TAG = "moe.submission_id"
# The tag still says "stage", its name before the DAG's steps were called steps: runs
# already stored, and searches for them, keep matching.
STEP_TAG = "moe.stage"
CACHE_HIT_TAG = "moe.cache_hit"


def make_client(cfg):
    """The pipeline's MLflow client; half a pair of credentials is refused here, before any work."""
    from mlflow import MlflowClient

    check_mlflow_credentials()
    uri = resolve_tracking_uri(cfg.tracking.uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class Runs:
    """Starts the pipeline's runs in its experiment; the registry steps use ``client`` too."""

    def __init__(self, cfg):
        self.client = make_client(cfg)
        self.tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
        self.experiment_id = experiment_id(self.client, cfg.tracking.experiment)

    def start(
        self, name: str, tags: dict[str, Any], parent_run_id: str | None = None
    ) -> ClientTracker:
        return ClientTracker.start(self.client, self.experiment_id, name, tags, parent_run_id)

    @contextmanager
    def step(self, name: str, parent_run_id: str | None, tags: dict[str, Any] | None = None):
        """The nested run of one step, ended ``FAILED`` if the step raises."""
        run = self.start(name, {STEP_TAG: name, **(tags or {})}, parent_run_id)
        try:
            yield run
        except BaseException:
            run.close("FAILED")
            raise
        run.close()


def log_json(run: Tracker, name: str, payload: Any, artifact_path: str | None = None) -> None:
    """``payload``, redacted, as the JSON artifact ``name`` of ``run``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(redact(payload), indent=2, default=str))
        run.log_artifact(str(path), artifact_path)


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
