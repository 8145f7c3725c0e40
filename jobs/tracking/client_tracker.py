"""A ``Tracker`` on one MLflow run with an explicit id, written at once through ``MlflowClient``.

The pipeline's runs use it: its parent run and one nested run per DAG step.
No fluent "active run", so the training driver, which opens its own nested run
under the same parent in the same process, never collides with one left active
here; no queue or thread either, so each call has reached MLflow when it returns.
Tags, params and the run's start tags pass through ``redact``.
"""

from __future__ import annotations

import time
from typing import Any

from jobs.tracking.base import flatten_params
from jobs.tracking.delivery import MAX_PARAM_LEN, MAX_PARAMS_PER_BATCH
from pipeline.redaction import redact


class ClientTracker:
    def __init__(self, client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(
        cls,
        client,
        experiment_id: str,
        name: str,
        tags: dict[str, Any],
        parent_run_id: str | None = None,
    ) -> ClientTracker:
        """A new run named ``name``, nested under ``parent_run_id`` when one is given."""
        tags = {k: str(v) for k, v in redact(dict(tags)).items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        return cls(client, run.info.run_id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(redact(params))
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in redact(dict(tags)).items():
            self.client.set_tag(self.run_id, key, str(value))

    def flush(self, timeout: float = 10.0) -> bool:
        return True  # every call above has been delivered when it returns

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
