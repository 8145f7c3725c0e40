"""Recurring runs: triggers, the run history's guarantees, and the daemon against a real
Ray cluster (fires on an interval, skips while the previous run is going, survives a
restart without duplicates)."""

from __future__ import annotations

import os
import pickle
import sqlite3
import stat
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from jobs.errors import JobError
from jobs.service import submit
from jobs.service.config import ScheduleConfig
from jobs.service.daemon import run_daemon
from jobs.service.schedule_store import ScheduleStore
from jobs.service.scheduler import fire, make_trigger, submission_id

REPO = Path(__file__).resolve().parents[2]


def test_cron_follows_crontab_weekdays_and_seconds():
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)  # a Thursday
    monday = make_trigger({"cron": "30 9 * * 1"}).get_next_fire_time(None, start)
    assert (monday.weekday(), monday.hour, monday.minute) == (0, 9, 30)
    sunday = make_trigger({"cron": "0 0 * * 0"}).get_next_fire_time(None, start)
    assert sunday.weekday() == 6
    every_5s = make_trigger({"cron": "*/5 * * * * *"}).get_next_fire_time(None, start)
    assert every_5s == start
    with pytest.raises(JobError, match="cron"):
        make_trigger({"cron": "* * *"})
    assert submission_id("nightly", start) == "nightly-20260101T000000Z"


def test_store_refuses_duplicate_runs_and_names(tmp_path):
    store = ScheduleStore(tmp_path / "s.db")
    store.add("a", {"every": 60}, {}, "http://h:8265")
    with pytest.raises(JobError, match="already exists"):
        store.add("a", {"every": 60}, {}, "http://h:8265")
    assert store.record("a", "t1", "a-t1", "SUBMITTING")
    assert not store.record("a", "t1", "a-t1-other", "SUBMITTING")  # same scheduled time
    assert not store.record("a", "t2", "a-t1", "SUBMITTING")  # same submission id
    # Another process opening the same file sees the same state (what a restart relies on).
    again = ScheduleStore(tmp_path / "s.db")
    assert [r.submission_id for r in again.history("a")] == ["a-t1"]
    again.set_paused("a", True)
    assert store.get("a").paused


def test_schedule_add_stores_no_credential(tmp_path, monkeypatch, capsys):
    """``schedule add`` keeps the config tree for later: credentials stay out of the file."""
    from jobs.cli import main

    store = tmp_path / "schedules.db"
    overrides = [
        f"schedule.store={store}", "data.s3.secret=PLANTED1",
        "cluster.env_vars.PGPASSWORD=PLANTED2", "tracking.uri=http://ci:PLANTED3@mlflow:5000",
        "data.s3.endpoint_url=http://minio:9000/?X-Amz-Signature=PLANTED4", "train.max_steps=7",
    ]  # fmt: skip
    args = ["schedule", "add", "nightly", "--every", "60", "--address", "http://head:8265"]
    monkeypatch.setattr("sys.argv", ["moe-pretrain", *args, *[f"--set={o}" for o in overrides]])
    with pytest.raises(SystemExit) as done:
        main()
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "PLANTED" not in store.read_bytes().decode("latin-1")
    assert "not stored (credentials): data.s3.secret" in out and "PLANTED" not in out
    saved = ScheduleStore(store).require("nightly").tree
    assert saved["tracking"]["uri"] == "http://mlflow:5000"
    assert saved["train"]["max_steps"] == 7 and "PGPASSWORD" not in saved["cluster"]["env_vars"]


def runs_of(store: ScheduleStore, name: str):
    return sorted(store.history(name, limit=100), key=lambda r: r.scheduled_time)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def start_daemon(cfg: ScheduleConfig) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=run_daemon, args=(cfg, stop), daemon=True)
    thread.start()
    return thread, stop


@pytest.mark.slow
def test_daemon_fires_skips_and_restarts_without_duplicates(
    ray_cluster, mlflow_uri, monkeypatch, tmp_path
):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_cluster.token)
    cfg = ScheduleConfig(store=str(tmp_path / "schedules.db"), poll_seconds=1)
    store = ScheduleStore(cfg.store)
    # Each run is a real `run` job that fails in prepare (no such corpus) after its
    # pipeline run is opened in MLflow: long enough to overlap the next trigger.
    tree = {
        "data": {"inputs": ["/nonexistent/scheduled-corpus"]},
        "storage": {"root": str(tmp_path / "out")},
        "cluster": {"working_dir": str(REPO)},
    }
    store.add("quick", {"every": 3}, tree, ray_cluster.address)

    thread, stop = start_daemon(cfg)
    wait_for(
        lambda: any(r.status == "SKIPPED" for r in runs_of(store, "quick")),
        timeout=90, what="no skip recorded while the first run was going",
    )  # fmt: skip
    stop.set()
    thread.join(timeout=60)
    before = runs_of(store, "quick")
    first = before[0]
    assert first.status not in ("SKIPPED", "SUBMIT_FAILED"), first
    assert all("still running" in r.note for r in before if r.status == "SKIPPED")

    time.sleep(7)  # two triggers are missed while the daemon is down
    thread, stop = start_daemon(cfg)
    wait_for(lambda: len(runs_of(store, "quick")) > len(before), 60, "no run after restart")
    time.sleep(1.5)
    store.set_paused("quick", True)
    time.sleep(2)
    stop.set()
    thread.join(timeout=60)

    after = runs_of(store, "quick")
    times = [datetime.fromisoformat(r.scheduled_time) for r in after]
    ids = [r.submission_id for r in after]
    assert len(set(ids)) == len(ids) and len(set(times)) == len(times)
    resumed = [t for t in times if t > datetime.fromisoformat(before[-1].scheduled_time)]
    # The misses coalesce: the first run after the restart is the latest missed time, so
    # consecutive runs after it are one interval apart.
    assert resumed and all(
        b - a == timedelta(seconds=3) for a, b in zip(resumed, resumed[1:], strict=False)
    )
    assert resumed[0] - datetime.fromisoformat(before[-1].scheduled_time) >= timedelta(seconds=6)

    # Every run submitted went to the cluster under its deterministic id, once.
    jobs = submit.client(ray_cluster.address).list_jobs()
    ours = [j.submission_id for j in jobs if (j.metadata or {}).get("schedule") == "quick"]
    submitted = [r.submission_id for r in after if r.status not in ("SKIPPED", "SUBMIT_FAILED")]
    assert sorted(ours) == sorted(submitted)

    # A duplicate trigger for an already recorded time starts nothing.
    again = fire("quick", cfg.store, datetime.fromisoformat(first.scheduled_time))
    assert again == "duplicate"
    assert len(submit.client(ray_cluster.address).list_jobs()) == len(jobs)

    # When the first run ends, history shows its status and its MLflow pipeline run.
    from jobs.service.scheduler import refresh_all

    def first_done():
        refresh_all(store)
        return runs_of(store, "quick")[0].status in submit.TERMINAL

    wait_for(first_done, timeout=180, what="first scheduled run never finished")
    done = runs_of(store, "quick")[0]
    assert done.status == "FAILED" and done.mlflow_run_id and not done.model_version


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_daemon_never_unpickles_its_database_and_keeps_it_private(tmp_path):
    """APScheduler's SQLAlchemy job store pickles each job into the schedules file: a
    ``job_state`` planted there must not run when the daemon starts."""
    marker = tmp_path / "PWNED"
    cfg = ScheduleConfig(store=str(tmp_path / "schedules.db"), poll_seconds=0.2)
    store = ScheduleStore(cfg.store)
    assert stat.S_IMODE(os.stat(cfg.store).st_mode) == 0o600
    store.add("nightly", {"cron": "0 3 * * *"}, {}, "http://127.0.0.1:9")
    with closing_db(cfg.store) as db:
        db.execute(
            "CREATE TABLE apscheduler_jobs (id VARCHAR(191) PRIMARY KEY, "
            "next_run_time FLOAT, job_state BLOB NOT NULL)"
        )
        planted = pickle.dumps(_Payload(marker))
        db.execute("INSERT INTO apscheduler_jobs VALUES ('nightly', ?, ?)", (time.time(), planted))
        db.execute("INSERT INTO apscheduler_jobs VALUES ('other', ?, ?)", (time.time(), planted))

    def recorded():
        with closing_db(cfg.store) as db:
            return db.execute("SELECT name, next_run_time FROM fire_times").fetchall()

    thread, stop = start_daemon(cfg)
    try:
        rows = wait_for(recorded, timeout=60, what="the daemon never recorded a fire time")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not marker.exists(), "the daemon unpickled a job from its database"
    assert [name for name, _ in rows] == ["nightly"]
    assert stat.S_IMODE(os.stat(cfg.store).st_mode) == 0o600


def closing_db(path: str):
    from contextlib import closing

    db = sqlite3.connect(path)
    db.isolation_level = None  # autocommit
    return closing(db)


def test_a_failed_mlflow_lookup_is_logged_without_credentials(monkeypatch, caplog):
    """The daemon's own ``$MLFLOW_TRACKING_URI`` may carry userinfo, and MLflow names the URL
    it failed to reach: the warning shows it redacted."""
    from servers import free_port

    from jobs.service.schedule_store import Schedule
    from jobs.service.scheduler import outcome

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ops:hunter2@127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    sched = Schedule("nightly", {"every": 60}, {}, "http://127.0.0.1:8265", False)
    with caplog.at_level("WARNING", logger="moe_pretrain.scheduler"):
        assert outcome(sched, "nightly-20260101T000000Z") == {}
    assert "MLflow lookup failed" in caplog.text
    assert "hunter2" not in caplog.text
    assert "http://***@127.0.0.1" in caplog.text
