"""``moe-pretrain scheduler`` as its own process: no fault in a poll or a fire ends it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from jobs.service.schedule_store import ScheduleStore
from tests.servers import free_port

CLI = str(Path(sys.executable).parent / "moe-pretrain")


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def test_the_daemon_survives_a_corrupt_schedule_and_records_why_its_fire_failed(tmp_path):
    store_path = tmp_path / "schedules.db"
    common = [f"--set=schedule.store={store_path}", "--set=schedule.poll_seconds=1"]
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every submit fails cleanly
    for name in ("healthy", "broken"):
        subprocess.run([CLI, "schedule", "add", name, "--every", "2", "--address", dead, *common],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
    with open(tmp_path / "daemon.log", "w") as log:
        daemon = subprocess.Popen([CLI, "scheduler", *common], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        store = ScheduleStore(store_path)
        _wait(lambda: store.history("broken"), 120, "the daemon never fired")
        with sqlite3.connect(store_path) as db:  # a row no JSON parser accepts
            db.execute("UPDATE schedules SET tree = '{not json' WHERE name = 'broken'")
        fired = len(store.history("healthy", limit=1000))
        _wait(lambda: len(store.history("healthy", limit=1000)) >= fired + 3, 60,
              "the healthy schedule stopped firing after the other one broke")  # fmt: skip
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
        text = (tmp_path / "daemon.log").read_text()
        assert "poll failed" in text and "JSONDecodeError" in text
        failed = [r for r in ScheduleStore(store_path).history(limit=1000)
                  if r.schedule == "broken" and "JSONDecodeError" in r.note]  # fmt: skip
        assert failed and all(r.status == "SUBMIT_FAILED" for r in failed)
    finally:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=30)
