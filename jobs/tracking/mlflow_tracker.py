"""MLflow tracking that never stalls training and loses nothing while the server is down.

Every call only enqueues; one background thread creates (or, on resume, finds)
the run and delivers metrics, params, tags and artifacts in order. When the
server cannot be reached the thread keeps the items, warns once, and retries;
``close()`` keeps retrying until its deadline and then writes what is left to a
local spool folder (JSON lines + artifact copies) and names it in a warning.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.tracking.base import flatten_params, resolve_tracking_uri
from pipeline.redaction import redact, redact_uri

log = logging.getLogger(__name__)

RUN_KEY_TAG = "moe.run_key"
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_LEN = 6000
# MLflow's REST client retries a dead server for minutes by default; the thread
# retries on its own schedule instead, so each attempt should fail fast.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class MlflowTracker:
    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "moe-pretrain",
        run_name: str | None = None,
        run_key: str | None = None,
        parent_run_id: str | None = None,
        system_metrics: bool = True,
        retry_interval_s: float = 5.0,
        close_timeout_s: float = 60.0,
        spool_dir: str | None = None,
    ) -> None:
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.uri = resolve_tracking_uri(uri)
        self.shown_uri = redact_uri(self.uri)  # what logs say: never the URI's userinfo
        self.experiment = experiment
        self.run_name = run_name
        self.run_key = run_key or run_name
        self.parent_run_id = parent_run_id
        self.system_metrics = system_metrics
        self.retry_interval_s = retry_interval_s
        self.close_timeout_s = close_timeout_s
        self.spool_dir = Path(spool_dir or tempfile.mkdtemp(prefix="moe-mlflow-spool-"))
        self.run_id: str | None = None
        self.resumed = False
        self.delivered = 0
        self.dropped = 0
        self._enqueued = 0
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[tuple] = []
        self._artifact_seq = 0
        self._client = None
        self._monitor = None
        self._warned = False
        self._status = "FINISHED"
        self._closing = False
        self._wake = threading.Event()
        self._run_ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # -- the non-blocking interface ------------------------------------------------------

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._put(("metrics", {k: float(v) for k, v in metrics.items()}, step, now))

    def log_params(self, params: dict[str, Any]) -> None:
        flat = flatten_params(redact(params))
        self._put(("params", {k: _param_value(v) for k, v in flat.items()}))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put(("tags", {k: str(v) for k, v in redact(tags).items()}))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Copies the file now, so the caller may overwrite it while delivery is pending."""
        self._artifact_seq += 1
        copy = self.spool_dir / "artifacts" / f"{self._artifact_seq:06d}" / Path(path).name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
        self._put(("artifact", str(copy), artifact_path))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (at most ``timeout``) until everything logged so far is delivered.

        Returns at once while the server is known to be down: called at
        checkpoints, so that metrics up to a checkpoint survive a hard kill of
        this process, without ever making an outage stall training.
        """
        deadline = time.monotonic() + timeout
        while self.delivered + self.dropped < self._enqueued:
            if self._warned or not self._thread.is_alive() or time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def wait_for_run(self, timeout: float) -> str | None:
        self._run_ready.wait(timeout)
        return self.run_id

    def close(self, status: str = "FINISHED") -> None:
        """Deliver everything (up to ``close_timeout_s``), end the run, spool what is left."""
        self._status = status
        self._queue.put(("close",))
        self._wake.set()
        self._thread.join(self.close_timeout_s + 30)

    def _put(self, item: tuple) -> None:
        self._enqueued += 1
        self._queue.put(item)

    # -- the background thread ----------------------------------------------------------

    def _run(self) -> None:
        deadline = None
        while True:
            self._drain(block=not self._pending and not self._closing)
            self._try_deliver()
            if self._closing:
                deadline = deadline or time.monotonic() + self.close_timeout_s
                if not self._pending or time.monotonic() > deadline:
                    self._finish()
                    return
            if self._pending:
                self._wake.wait(self.retry_interval_s)

    def _drain(self, block: bool) -> None:
        """Move queued items to ``_pending``; a ``close`` item sets ``_closing``."""
        try:
            item = self._queue.get() if block else self._queue.get_nowait()
            while True:
                if item[0] == "close":
                    self._closing = True
                else:
                    self._pending.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass

    def _try_deliver(self) -> None:
        while True:
            try:
                self._ensure_run()
                self._deliver()
            except Exception as e:
                if self.run_id is not None and not _transient(e):
                    log.warning(
                        "MLflow rejected an item, dropping it: %s", redact_uri(str(e))[:300]
                    )
                    self._pending.pop(0)
                    self.dropped += 1
                    continue
                if not self._warned:
                    log.warning(
                        "MLflow at %s unreachable (%s); training goes on, metrics are kept",
                        self.shown_uri,
                        redact_uri(str(e).splitlines()[0])[:200],
                    )
                    self._warned = True
                return
            if self._warned:
                log.warning(
                    "MLflow at %s is reachable again; delivered the backlog", self.shown_uri
                )
                self._warned = False
            return

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        from mlflow import MlflowClient

        self._client = MlflowClient(self.uri)
        exp_id = self._experiment_id()
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
        self._run_ready.set()
        if self.system_metrics:
            self._start_system_metrics()

    def _experiment_id(self) -> str:
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self._client.create_experiment(self.experiment)
        except Exception:
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=self.resumed, tracking_uri=self.uri
            )
            self._monitor.start()
        except Exception as e:
            log.warning("MLflow system metrics are off: %s", redact_uri(str(e)))

    def _deliver(self) -> None:
        while self._pending:
            kind, *args = self._pending[0]
            if kind == "metrics":
                done = self._deliver_metrics()
            else:
                if kind == "params":
                    self._deliver_params(args[0])
                elif kind == "tags":
                    self._deliver_tags(args[0])
                else:
                    self._client.log_artifact(self.run_id, args[0], args[1])
                done = 1
            del self._pending[:done]
            self.delivered += done

    def _deliver_metrics(self) -> int:
        """Send the leading run of metric items as one batch; returns how many it took."""
        from mlflow.entities import Metric

        batch, taken = [], 0
        for item in self._pending:
            if item[0] != "metrics" or len(batch) + len(item[1]) > _MAX_METRICS_PER_BATCH:
                break
            _, values, step, ts = item
            batch.extend(Metric(k, v, ts, step) for k, v in values.items())
            taken += 1
        if taken == 0:
            _, values, step, ts = self._pending[0]
            batch, taken = [Metric(k, v, ts, step) for k, v in values.items()], 1
        self._client.log_batch(self.run_id, metrics=batch)
        return taken

    def _deliver_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        known = self._client.get_run(self.run_id).data.params if self.resumed else {}
        fresh = [Param(k, v) for k, v in params.items() if k not in known]
        for i in range(0, len(fresh), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=fresh[i : i + _MAX_PARAMS_PER_BATCH])

    def _deliver_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _finish(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
        if self._pending:
            self._spool()
            return
        try:
            self._client.set_terminated(self.run_id, status=self._status)
        except Exception as e:
            log.warning("could not end MLflow run %s: %s", self.run_id, redact_uri(str(e)))

    def _spool(self) -> None:
        path = self.spool_dir / "pending.jsonl"
        with path.open("a") as f:
            for item in self._pending:
                f.write(json.dumps(list(item)) + "\n")
        log.warning(
            "MLflow at %s still unreachable at the end: %d undelivered items kept in %s",
            self.shown_uri,
            len(self._pending),
            path,
        )


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:_MAX_PARAM_LEN]


def _transient(err: Exception) -> bool:
    """Connection trouble and 5xx are worth retrying; a 4xx rejection never succeeds."""
    get_status = getattr(err, "get_http_status_code", None)
    if get_status is None:
        return True
    text = str(err)
    if "Max retries exceeded" in text or "Connection" in text or "timed out" in text:
        return True
    return get_status() >= 500


@dataclass
class MlflowSpec:
    """What a worker needs to open the run: plain data, so it travels to Ray workers."""

    uri: str
    experiment: str = "moe-pretrain"
    run_name: str | None = None
    run_key: str | None = None
    parent_run_id: str | None = None
    system_metrics: bool = True
    close_timeout_s: float = 60.0

    def create(self) -> MlflowTracker:
        return MlflowTracker(
            uri=self.uri,
            experiment=self.experiment,
            run_name=self.run_name,
            run_key=self.run_key,
            parent_run_id=self.parent_run_id,
            system_metrics=self.system_metrics,
            close_timeout_s=self.close_timeout_s,
        )
