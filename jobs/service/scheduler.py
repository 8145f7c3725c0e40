"""Recurring pipeline runs: APScheduler 3 with a SQLite job store, one Ray job per due run.

Guarantees, and what gives each one:
- A duplicate trigger cannot start a run twice: the submission id is the
  schedule name plus the scheduled time; the history's unique key refuses a
  second row, and the Ray job server refuses a second job with that id.
- A run never starts while the previous run of its schedule is still going:
  ``fire`` asks Ray first, and records a ``SKIPPED`` row instead.
- A restart loses nothing and duplicates nothing: schedules and next fire
  times live in SQLite; runs missed while the daemon was down coalesce into
  one (``coalesce=True``, no misfire grace limit).
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from datetime import datetime, timezone
from typing import Any

from jobs.errors import JobError
from jobs.service import submit
from jobs.service.schedule_store import ACTIVE, Schedule, ScheduleStore
from pipeline.redaction import redact_uri

log = logging.getLogger("moe_pretrain.scheduler")
# Submission ids that a fire in this process is submitting (see ``refresh_run``).
_in_flight: set[str] = set()
_lock = threading.Lock()
_DOW = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise JobError(f"schedule name must be letters, digits, '_' or '-', got {name!r}")
    return name


def make_trigger(spec: dict[str, Any]):
    """``{"every": seconds}`` or ``{"cron": "m h dom mon dow"}`` (a 6th leading field = seconds).

    Weekday numbers follow crontab (0 and 7 = Sunday); APScheduler 3 counts
    from Monday, so numbers are turned into names first.
    """
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    if "every" in spec:
        return IntervalTrigger(seconds=float(spec["every"]), timezone=timezone.utc)
    fields = spec["cron"].split()
    if len(fields) not in (5, 6):
        raise JobError(f"cron: expected 5 fields (or 6 with seconds), got {spec['cron']!r}")
    second = fields.pop(0) if len(fields) == 6 else "0"
    minute, hour, day, month, dow = fields
    dow = re.sub(r"\d+", lambda m: _DOW[int(m.group()) % 7], dow)
    try:
        return CronTrigger(
            second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=dow,
            timezone=timezone.utc,
        )  # fmt: skip
    except ValueError as e:
        raise JobError(f"cron {spec['cron']!r}: {e}") from None


def submission_id(name: str, scheduled: datetime) -> str:
    return f"{name}-{scheduled.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"


def fire(name: str, store_path: str, scheduled_time: datetime | None = None) -> str:
    """Submit the run of ``name`` due at ``scheduled_time``; returns what was recorded.

    ``scheduled_time`` is filled in by the daemon's executor (see ``daemon.stamped_executor``);
    it defaults to None only so that APScheduler accepts the job without it.
    """
    assert scheduled_time is not None, "fire() runs through the stamped executor"
    store = ScheduleStore(store_path)
    sched = store.get(name)
    if sched is None:
        return "gone"
    sid, when = submission_id(name, scheduled_time), scheduled_time.isoformat()
    if store.has_run(name, when):
        return "duplicate"
    busy = _still_running(store, sched)
    if busy is not None:
        store.record(name, when, sid, "SKIPPED", f"previous run {busy} still running")
        log.info("%s: skipped, %s still running", sid, busy)
        return "SKIPPED"
    with _lock:
        _in_flight.add(sid)
    try:
        return _submit(store, sched, sid, when)
    finally:
        with _lock:
            _in_flight.discard(sid)


def _submit(store: ScheduleStore, sched: Schedule, sid: str, when: str) -> str:
    name = sched.name
    if not store.record(name, when, sid, "SUBMITTING"):
        return "duplicate"
    try:
        cluster = _root(sched.tree).cluster
        meta = {"schedule": name, "scheduled_time": when}
        _, withheld = submit.submit_run(
            sched.tree, cluster, sched.address, submission_id=sid, metadata_=meta
        )
        store.update(sid, status="PENDING")
        for line in submit.withheld_lines(withheld):
            log.info("%s: %s", sid, line)
    except submit.DuplicateSubmission:
        store.update(sid, status="PENDING", note="already on the cluster")
    except JobError as e:
        store.update(sid, status="SUBMIT_FAILED", note=str(e))
        return "SUBMIT_FAILED"
    log.info("%s: submitted", sid)
    return "PENDING"


def _root(tree: dict[str, Any]):
    from jobs.config import RootConfig
    from jobs.settings import build

    return build(RootConfig, copy.deepcopy(tree))


def _still_running(store: ScheduleStore, sched: Schedule) -> str | None:
    """The id of an earlier run of this schedule that is not finished, after asking Ray."""
    for run in store.active_runs(sched.name):
        if refresh_run(store, sched, run.submission_id) in ACTIVE:
            return run.submission_id
    return None


def refresh_run(store: ScheduleStore, sched: Schedule | None, sid: str) -> str:
    """Ask Ray for a run's status; when it has ended, look up its MLflow outcome.

    A run this process is submitting right now is not asked about: Ray does not know
    it yet, and its "does not exist" would mark it LOST while it is being submitted.
    """
    if sched is None:
        return "UNKNOWN"
    with _lock:
        if sid in _in_flight:
            return "SUBMITTING"
    try:
        status = submit.job_info(sched.address, sid).status
    except JobError as e:
        if "does not exist" in str(e) or "not found" in str(e).lower():
            store.update(sid, status="LOST", note=str(e))
            return "LOST"
        return "RUNNING"  # cluster unreachable: assume the worst, never double-start
    if status in submit.TERMINAL:
        store.update(sid, status=status, **outcome(sched, sid))
    elif status in ACTIVE:
        store.update(sid, status=status)
    return status


def outcome(sched: Schedule, sid: str) -> dict[str, str]:
    """MLflow run id, model version and champion flag of the pipeline run a job made."""
    from jobs.service.tracking import find_pipeline_run

    try:
        run = find_pipeline_run(_root(sched.tree), sid)
    except Exception as e:  # tracking down must not stop the scheduler
        # MLflow names the URL it failed to reach, userinfo included.
        log.warning("%s: MLflow lookup failed: %s", sid, redact_uri(str(e)))
        return {}
    if run is None:
        return {}
    tags = run.data.tags
    return {
        "mlflow_run_id": run.info.run_id,
        "model_version": tags.get("moe.model_version", ""),
        "became_champion": tags.get("moe.became_champion", ""),
    }


def refresh_all(store: ScheduleStore) -> None:
    scheds = {s.name: s for s in store.list()}
    for run in store.active_runs():
        refresh_run(store, scheds.get(run.schedule), run.submission_id)
