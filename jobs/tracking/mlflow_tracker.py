"""MLflow tracking that never stalls training and loses nothing while the server is down.

Every call only enqueues; one background thread creates (or, on resume, finds)
the run and delivers metrics, params, tags and artifacts in order. When the
server cannot be reached, throttles us (HTTP 429, retried with backoff) or
refuses our credentials (401/403), the thread keeps the items, warns once, and
writes them to the spool (``jobs.tracking.spool``; the trainer's lives in the
run's folder) at most every ``spool_interval_s``, or at once when ``flush()``
asks, which the loop does at every checkpoint. The next tracker of the same run
(its resume) delivers the spool first, then deletes it. ``close()`` keeps
retrying until its deadline, spools what is left and says where, and why. The
writes themselves and the retry schedule are ``jobs.tracking.delivery``'s.
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

from jobs.auth import check_mlflow_credentials
from jobs.tracking.base import flatten_params, resolve_tracking_uri
from jobs.tracking.delivery import MAX_PARAM_LEN, MlflowRun, Retry, classify
from jobs.tracking.spool import KINDS, Spool
from pipeline.redaction import redact, redact_uri

log = logging.getLogger(__name__)

# MLflow's REST client retries a dead server for minutes by default; the thread
# retries on its own schedule instead, so each attempt should fail fast.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass
class _Entry:
    seq: int  # order of logging in this process; 0 for items read back from the spool
    item: tuple
    segment: str | None = None  # the spool segment that holds it, once spooled


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
        spool_uri: str | None = None,
        spool_interval_s: float = 5.0,
    ) -> None:
        check_mlflow_credentials()  # in the caller's thread: the delivery thread would only retry
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.uri = resolve_tracking_uri(uri)
        self.shown_uri = redact_uri(self.uri)  # what logs say: never the URI's userinfo
        self.run = MlflowRun(
            self.uri, experiment, run_name, run_key or run_name, parent_run_id, system_metrics
        )
        self.retry = Retry(retry_interval_s)
        self.close_timeout_s = close_timeout_s
        self.spool_dir = Path(spool_dir or tempfile.mkdtemp(prefix="moe-mlflow-spool-"))
        self.spool = Spool(spool_uri or str(self.spool_dir))
        self.spool_interval_s = spool_interval_s
        self.delivered = 0
        self.dropped = 0
        self.replayed = 0  # items read back from an earlier process's spool
        self._logged = 0  # seq of the last item logged
        self._safe = 0  # every item up to this seq is delivered, dropped or spooled
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[_Entry] = []
        self._artifact_seq = 0
        self._status = "FINISHED"
        self._closing = False
        self._last_spool = -float("inf")
        self._spool_now = False
        self._spool_failed = False
        self._wake = threading.Event()
        self._run_ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        return self.run.run_id

    @property
    def resumed(self) -> bool:
        return self.run.resumed

    @property
    def refused(self) -> int | None:
        """The HTTP status (401/403) while the server refuses our credentials, else None."""
        return self.retry.refused

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
        """Wait (at most ``timeout``) until everything logged so far is delivered or, while
        MLflow is down or refuses us, written to the spool.

        Called at checkpoints, so that metrics up to a checkpoint survive a hard kill of
        this process; during an outage it waits for one small spool write only.
        """
        target = self._logged
        deadline = time.monotonic() + timeout
        if self._safe < target:
            self._spool_now = True
            self._wake.set()
        while self._safe < target:
            if not self._thread.is_alive() or time.monotonic() > deadline:
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
        self._logged += 1
        self._queue.put(_Entry(self._logged, item))

    # -- the background thread ----------------------------------------------------------

    def _loop(self) -> None:
        self._replay()
        deadline = None
        while True:
            self._drain(block=not self._pending and not self._closing)
            self._spool_if_due()  # before a retry that may hang on a stuck server
            if time.monotonic() >= self.retry.next_try or (self._closing and deadline is None):
                self._try_deliver()
            self._spool_if_due()
            if self._closing:
                deadline = deadline or time.monotonic() + self.close_timeout_s
                # Refused credentials stay refused for this process: spool at once.
                if not self._pending or self.refused or time.monotonic() > deadline:
                    self._finish()
                    return
            if self._pending:
                self._wake.wait(max(0.0, self._next_wake() - time.monotonic()))
                self._wake.clear()

    def _drain(self, block: bool) -> None:
        """Move queued items to ``_pending``; a ``close`` item sets ``_closing``."""
        try:
            entry = self._queue.get() if block else self._queue.get_nowait()
            while True:
                if isinstance(entry, _Entry):
                    self._pending.append(entry)
                else:
                    self._closing = True
                entry = self._queue.get_nowait()
        except queue.Empty:
            pass

    def _next_wake(self) -> float:
        wake = self.retry.next_try
        if self.retry.warned and self._pending[-1].segment is None:
            wake = min(wake, self._last_spool + self.spool_interval_s)
        return wake

    # -- the spool ----------------------------------------------------------------------

    def _replay(self) -> None:
        """Put an earlier process's spool (this run's, killed or cut off from MLflow) before
        anything this one logs. A segment that cannot be read stays for the next start."""
        try:
            names = self.spool.segments()
        except Exception as e:  # the thread must outlive any storage fault
            log.warning("could not list the MLflow spool at %s: %s", self.spool.uri, e)
            return
        for name in names:
            try:
                items = self.spool.read(name)
            except Exception as e:  # SpoolError, or the storage's own
                log.warning("MLflow spool segment %s left in place: %s", name, str(e)[:200])
                continue
            self._pending.extend(_Entry(0, item, name) for item in items)
        self.replayed = len(self._pending)
        if self.replayed:
            log.info("delivering %d spooled items from %s", self.replayed, self.spool.uri)

    def _spool_if_due(self, force: bool = False) -> None:
        """While MLflow is down (or refuses us), write what is not in the spool yet: at most
        every ``spool_interval_s``, at once when ``flush()`` or ``close()`` asks."""
        if (
            not (self._pending and (self.retry.warned or force))
            or self._pending[-1].segment is not None
        ):
            return
        now = time.monotonic()
        due = force or self._spool_now or now >= self._last_spool + self.spool_interval_s
        if not due:
            return
        self._spool_now = False
        self._last_spool = now
        fresh = [e for e in self._pending if e.segment is None]
        durable = [e.item for e in fresh if e.item[0] in KINDS]
        try:
            name = self.spool.write(durable) if durable else ""
        except Exception as e:  # storage down too: kept in memory, retried next interval
            if not self._spool_failed:
                log.warning("could not write the MLflow spool at %s: %s", self.spool.uri, e)
                self._spool_failed = True
            return
        self._spool_failed = False
        for entry in fresh:
            entry.segment = name
        self._safe = max(self._safe, fresh[-1].seq)

    def _release(self, done: list[_Entry]) -> None:
        """Delete the spool segments whose every item is now delivered. Killed before this,
        a resume delivers them again: MLflow keeps one metric per (key, step, value, time)."""
        still = self._pending[0].segment if self._pending else None
        for name in dict.fromkeys(e.segment for e in done):
            if name and name != still:
                try:
                    self.spool.delete(name)
                except Exception as e:
                    log.warning("could not delete MLflow spool segment %s: %s", name, e)

    # -- delivery -----------------------------------------------------------------------

    def _try_deliver(self) -> None:
        while True:
            try:
                self._open_run()
                self._deliver()
            except Exception as e:
                why = classify(e)
                if why == "rejected" and self.run_id is not None:
                    log.warning(
                        "MLflow rejected an item, dropping it: %s", redact_uri(str(e))[:300]
                    )
                    entry = self._pending.pop(0)
                    self._safe = max(self._safe, entry.seq)
                    self._release([entry])
                    self.dropped += 1
                    continue
                self._failed(why, e)
                return
            if self.retry.succeeded():
                log.warning(
                    "MLflow at %s is reachable again; delivered the backlog", self.shown_uri
                )
            return

    def _failed(self, why: str, err: Exception) -> None:
        """Keep everything, and warn once per outage."""
        if not self.retry.failed(why, err):
            return
        if why == "refused":
            log.warning(
                "MLflow at %s refused our credentials (HTTP %d); training goes on, metrics "
                "are spooled at %s",
                self.shown_uri,
                self.refused,
                self.spool.uri,
            )
        else:
            log.warning(
                "MLflow at %s %s (%s); training goes on, metrics are kept",
                self.shown_uri,
                "throttles us, retrying with backoff" if why == "busy" else "unreachable",
                redact_uri(str(err).splitlines()[0])[:200],
            )

    def _open_run(self) -> None:
        if self.run.open():
            self._run_ready.set()
            self.run.start_system_metrics()

    def _deliver(self) -> None:
        while self._pending:
            done = self.run.write(e.item for e in self._pending)
            delivered, self._pending = self._pending[:done], self._pending[done:]
            self._safe = max(self._safe, delivered[-1].seq)
            self._release(delivered)
            self.delivered += done

    def _finish(self) -> None:
        self.run.stop_system_metrics()
        if self._pending:
            self._spool_if_due(force=True)
            self._report_undelivered()
            return
        self.run.end(self._status)

    def _report_undelivered(self) -> None:
        metrics = sum(len(e.item[1]) for e in self._pending if e.item[0] == "metrics")
        kept = [e for e in self._pending if e.segment]
        where = f"spooled at {self.spool.uri}" if kept else "LOST (the spool could not be written)"
        why = (
            "MLflow refused our credentials"
            if self.refused
            else f"MLflow at {self.shown_uri} unreachable"
        )
        log.warning(
            "%d metrics %s, not delivered: %s; the run's next start delivers them",
            metrics,
            where,
            why,
        )
        artifacts = [e.item[1] for e in self._pending if e.item[0] == "artifact"]
        if artifacts:
            log.warning("%d artifacts not delivered, copies in %s", len(artifacts), self.spool_dir)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MAX_PARAM_LEN]


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
    spool_uri: str | None = None  # the trainer's: ``{run folder}/mlflow-spool``

    def create(self) -> MlflowTracker:
        return MlflowTracker(
            uri=self.uri,
            experiment=self.experiment,
            run_name=self.run_name,
            run_key=self.run_key,
            parent_run_id=self.parent_run_id,
            system_metrics=self.system_metrics,
            close_timeout_s=self.close_timeout_s,
            spool_uri=self.spool_uri,
        )
