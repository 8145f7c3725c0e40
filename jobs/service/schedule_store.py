"""Schedules, their next fire times and their run history, in one SQLite file (mode 0600).

The CLI only writes the ``schedules`` table; the daemon feeds APScheduler (with an
in-memory job store) from it and keeps each schedule's next fire time in
``fire_times``: plain columns, so nothing in the file is ever unpickled (APScheduler's
own SQLAlchemy job store pickles its jobs, and whoever could write the file would run
code in the daemon, which holds the Ray token and the MLflow and S3 credentials). ``runs`` has one row per
(schedule, scheduled time): the unique key is what makes a duplicate trigger
a no-op, and a skip is a row too, so history shows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import JobError
from pipeline.redaction import split_secrets

ACTIVE = ("SUBMITTING", "PENDING", "RUNNING")
SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY, trigger TEXT NOT NULL, tree TEXT NOT NULL, address TEXT NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    submission_id TEXT PRIMARY KEY, schedule TEXT NOT NULL, scheduled_time TEXT NOT NULL,
    status TEXT NOT NULL, note TEXT NOT NULL DEFAULT '', mlflow_run_id TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '', became_champion TEXT NOT NULL DEFAULT '',
    recorded_at REAL NOT NULL, UNIQUE (schedule, scheduled_time)
);
CREATE TABLE IF NOT EXISTS fire_times (name TEXT PRIMARY KEY, next_run_time REAL);
"""


@dataclass
class Schedule:
    name: str
    trigger: dict[str, Any]  # {"cron": "*/5 * * * *"} or {"every": 30}
    tree: dict[str, Any]  # config tree (YAML + --set) minus credentials, validated at add time
    address: str
    paused: bool

    def describe(self) -> str:
        return (
            f"cron {self.trigger['cron']}"
            if "cron" in self.trigger
            else (f"every {self.trigger['every']}s")
        )


@dataclass
class RunRecord:
    submission_id: str
    schedule: str
    scheduled_time: str
    status: str
    note: str
    mlflow_run_id: str
    model_version: str
    became_champion: str


class ScheduleStore:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only: the file holds config trees and decides what the daemon submits.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        with self._db() as db:
            db.executescript(SCHEMA)

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    @contextmanager
    def _db(self):
        # A long busy timeout: the daemon and the CLI write the same file.
        with closing(sqlite3.connect(self.path, timeout=30)) as db, db:
            db.row_factory = sqlite3.Row
            yield db

    def add(
        self, name: str, trigger: dict[str, Any], tree: dict[str, Any], address: str
    ) -> list[str]:
        """Store a schedule without its credentials; returns the dotted keys withheld.

        The file is readable by whoever can read the scheduler's folder, and the job never
        needed them: the cluster gives a job its credentials from its own environment."""
        tree, withheld = split_secrets(tree)
        address, in_address = split_secrets(address, "address")
        try:
            with self._db() as db:
                db.execute(
                    "INSERT INTO schedules VALUES (?, ?, ?, ?, 0, ?)",
                    (name, json.dumps(trigger), json.dumps(tree), address, time.time()),
                )
        except sqlite3.IntegrityError:
            raise JobError(f"schedule {name!r} already exists (remove it first)") from None
        return withheld + in_address

    def get(self, name: str) -> Schedule | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM schedules WHERE name = ?", (name,)).fetchone()
        return _schedule(row) if row else None

    def require(self, name: str) -> Schedule:
        s = self.get(name)
        if s is None:
            raise JobError(f"no schedule named {name!r}")
        return s

    def list(self) -> list[Schedule]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM schedules ORDER BY name").fetchall()
        return [_schedule(r) for r in rows]

    def set_paused(self, name: str, paused: bool) -> None:
        self.require(name)
        with self._db() as db:
            db.execute("UPDATE schedules SET paused = ? WHERE name = ?", (int(paused), name))

    def remove(self, name: str) -> None:
        self.require(name)
        with self._db() as db:
            db.execute("DELETE FROM schedules WHERE name = ?", (name,))

    def record(self, schedule: str, scheduled_time: str, sid: str, status: str, note="") -> bool:
        """Insert a run row; False if this (schedule, time) or id is already recorded."""
        with self._db() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO runs (submission_id, schedule, scheduled_time, status, note,"
                " recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
                (sid, schedule, scheduled_time, status, note, time.time()),
            )
            return cur.rowcount == 1

    def has_run(self, schedule: str, scheduled_time: str) -> bool:
        with self._db() as db:
            row = db.execute(
                "SELECT 1 FROM runs WHERE schedule = ? AND scheduled_time = ?",
                (schedule, scheduled_time),
            ).fetchone()
        return row is not None

    def update(self, sid: str, **fields: str) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE runs SET {cols} WHERE submission_id = ?", (*fields.values(), sid))

    def active_runs(self, schedule: str | None = None) -> list[RunRecord]:
        marks = ", ".join("?" * len(ACTIVE))
        sql = f"SELECT * FROM runs WHERE status IN ({marks})"
        args: tuple = ACTIVE
        if schedule:
            sql, args = f"{sql} AND schedule = ?", (*ACTIVE, schedule)
        with self._db() as db:
            rows = db.execute(f"{sql} ORDER BY scheduled_time", args).fetchall()
        return [_run(r) for r in rows]

    def history(self, schedule: str | None = None, limit: int = 50) -> list[RunRecord]:
        sql, args = "SELECT * FROM runs", ()
        if schedule:
            sql, args = f"{sql} WHERE schedule = ?", (schedule,)
        with self._db() as db:
            rows = db.execute(f"{sql} ORDER BY scheduled_time DESC LIMIT ?", (*args, limit))
            return [_run(r) for r in rows.fetchall()]

    def next_run_times(self) -> dict[str, float | None]:
        """The daemon's next fire time per schedule (epoch seconds; None = paused).

        A file last used by a daemon with APScheduler's SQL job store has its times in
        that table's plain ``next_run_time`` column (read without touching ``job_state``).
        """
        with self._db() as db:
            rows = db.execute("SELECT name, next_run_time FROM fire_times").fetchall()
            times = {r["name"]: r["next_run_time"] for r in rows}
            with contextlib.suppress(sqlite3.OperationalError):  # no such (legacy) table
                legacy = db.execute("SELECT id, next_run_time FROM apscheduler_jobs").fetchall()
                for r in legacy:
                    times.setdefault(r["id"], r["next_run_time"])
        return times

    def set_fire_times(self, times: dict[str, float | None]) -> None:
        with self._db() as db:
            db.execute("DELETE FROM fire_times")
            db.executemany("INSERT INTO fire_times VALUES (?, ?)", list(times.items()))


def _schedule(row: sqlite3.Row) -> Schedule:
    return Schedule(
        row["name"], json.loads(row["trigger"]), json.loads(row["tree"]), row["address"],
        bool(row["paused"]),
    )  # fmt: skip


def _run(row: sqlite3.Row) -> RunRecord:
    return RunRecord(**{k: row[k] for k in RunRecord.__dataclass_fields__})
