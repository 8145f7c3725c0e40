"""Getting tracking items into MLflow: the run they go to, batched writes, and when to retry.

``MlflowRun`` creates the run, or on resume finds it by its run key, and writes the
tracker's items in MLflow's batch sizes. ``classify`` sorts a failed write into what is
retried (``down``, ``busy``), waited out (``refused``) or dropped (``rejected``); ``Retry``
says when to try again: every ``interval_s``, doubling up to a minute while MLflow answers
429, and whether a failure is news worth a warning.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator

from pipeline.redaction import redact_uri

log = logging.getLogger(__name__)

RUN_KEY_TAG = "moe.run_key"
# MLflow's limits: items per log_batch, characters per param value.
_MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LEN = 6000
_MAX_BACKOFF_S = 60.0


def classify(err: Exception) -> str:
    """``down`` (connection trouble, 5xx) and ``busy`` (429) are retried, ``refused``
    (401/403) is spooled until the credentials work again; any other 4xx is ``rejected``:
    that item never succeeds."""
    get_status = getattr(err, "get_http_status_code", None)
    if get_status is None:
        return "down"
    text = str(err)
    if "too many 429 error responses" in text or get_status() == 429:
        return "busy"  # MLflow's HTTP client reports a 429 as a retry error
    if "Max retries exceeded" in text or "Connection" in text or "timed out" in text:
        return "down"
    if get_status() in (401, 403):
        return "refused"
    return "down" if get_status() >= 500 else "rejected"


class Retry:
    """When to try MLflow again, and why the last try failed (until one succeeds)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.next_try = 0.0
        self.warned: str | None = None  # why the last delivery failed, until one succeeds
        self.refused: int | None = None  # 401/403 while the server refuses our credentials
        self._backoff = interval_s

    def failed(self, why: str, err: Exception) -> bool:
        """Schedule the next try (429: backoff); True when this failure is news (warn once)."""
        wait = self.interval_s
        if why == "busy":
            wait, self._backoff = self._backoff, min(self._backoff * 2, _MAX_BACKOFF_S)
        self.next_try = time.monotonic() + wait
        if why == "refused":
            self.refused = err.get_http_status_code()
        news, self.warned = self.warned != why, why
        return news

    def succeeded(self) -> str | None:
        """Back to the normal schedule; returns why the tries before this one failed."""
        was, self.warned, self.refused = self.warned, None, None
        self._backoff = self.interval_s
        self.next_try = 0.0
        return was


def experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created when missing (or found, when someone else
    created it in between)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class MlflowRun:
    """One MLflow run, found by its run key on resume, and the tracker's items written to it."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None,
        run_key: str | None,
        parent_run_id: str | None,
        system_metrics: bool,
    ) -> None:
        self.uri, self.experiment = uri, experiment
        self.run_name, self.run_key, self.parent_run_id = run_name, run_key, parent_run_id
        self.system_metrics = system_metrics
        self.run_id: str | None = None
        self.resumed = False
        self._client = None
        self._monitor = None

    def open(self) -> bool:
        """Create or find the run; True when this call did (False: it was open already)."""
        if self.run_id is not None:
            return False
        from mlflow import MlflowClient

        self._client = MlflowClient(self.uri)
        exp_id = experiment_id(self._client, self.experiment)
        existing = self._client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'", max_results=1
        )
        if existing:
            self.run_id = existing[0].info.run_id
            self.resumed = True
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_KEY_TAG: self.run_key}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run = self._client.create_run(exp_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
        return True

    def start_system_metrics(self) -> None:
        if not self.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=self.resumed, tracking_uri=self.uri
            )
            self._monitor.start()
        except Exception as e:
            log.warning("MLflow system metrics are off: %s", redact_uri(str(e)))

    def write(self, items: Iterable[tuple]) -> int:
        """Write the leading items (a run of metrics as one batch, else one item); returns
        how many were written."""
        items = iter(items)
        first = next(items)
        kind, *args = first
        if kind == "metrics":
            return self._write_metrics(first, items)
        if kind == "params":
            self._write_params(args[0])
        elif kind == "tags":
            self._write_tags(args[0])
        else:
            self._client.log_artifact(self.run_id, args[0], args[1])
        return 1

    def _write_metrics(self, first: tuple, rest: Iterator[tuple]) -> int:
        from mlflow.entities import Metric

        batch, taken = [], 0
        for item in itertools.chain([first], rest):
            if item[0] != "metrics" or len(batch) + len(item[1]) > _MAX_METRICS_PER_BATCH:
                break
            _, values, step, ts = item
            batch.extend(Metric(k, v, ts, step) for k, v in values.items())
            taken += 1
        if taken == 0:  # one item over the batch limit on its own: MLflow says why
            _, values, step, ts = first
            batch, taken = [Metric(k, v, ts, step) for k, v in values.items()], 1
        self._client.log_batch(self.run_id, metrics=batch)
        return taken

    def _write_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        known = self._client.get_run(self.run_id).data.params if self.resumed else {}
        fresh = [Param(k, v) for k, v in params.items() if k not in known]
        for i in range(0, len(fresh), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=fresh[i : i + MAX_PARAMS_PER_BATCH])

    def _write_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def stop_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()

    def end(self, status: str) -> None:
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as e:
            log.warning("could not end MLflow run %s: %s", self.run_id, redact_uri(str(e)))
