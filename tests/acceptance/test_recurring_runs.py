"""Recurring runs as a user sets them up: ``moe-pretrain scheduler`` in its own process, a
corpus that grows between runs, and a daemon killed with SIGKILL and started again."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from jobs.service.schedule_store import ScheduleStore
from tests.acceptance.conftest import book, job_config, job_info

pytestmark = pytest.mark.slow
EVERY = 15  # seconds between fires; a run takes longer, so some fires are skipped


def _wait(predicate, timeout: float, what: str, daemon=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon is not None and daemon.poll() is not None:
            raise AssertionError(f"the daemon exited: {log.read_text()[-3000:]}")
        if value := predicate():
            return value
        time.sleep(1)
    raise TimeoutError(what)


def _succeeded(store: ScheduleStore) -> list:
    runs = sorted(store.history("nightly", limit=1000), key=lambda r: r.scheduled_time)
    failed = [r for r in runs if r.status in ("FAILED", "SUBMIT_FAILED", "LOST")]
    assert not failed, failed
    return [r for r in runs if r.status == "SUCCEEDED" and r.model_version]


def _stop(daemon) -> None:
    os.killpg(daemon.pid, signal.SIGKILL)
    daemon.wait(timeout=30)


def test_two_scheduled_runs_grow_the_dataset_continue_from_the_champion_and_survive_sigkill(
    user, ray_cluster, mlflow_server, tmp_path
):
    corpus = tmp_path / "corpus"
    book(corpus / "part1.txt", seed=2)
    config = job_config(tmp_path, [str(corpus)], train={"init_from": "champion"})
    name = yaml.safe_load(config.read_text())["registry"]["model_name"]
    store_path = tmp_path / "schedules.db"
    store_set = ["--set", f"schedule.store={store_path}", "--set", "schedule.poll_seconds=1"]
    user.run("schedule", "add", "nightly", "--every", str(EVERY), "--config", str(config),
             "--address", ray_cluster.address, *store_set)  # fmt: skip
    store = ScheduleStore(store_path)

    log = tmp_path / "daemon.log"
    daemon = user.popen("scheduler", *store_set, log=log)
    try:
        first = _wait(lambda: _succeeded(store), 600, "no first run", daemon, log)[0]
        book(corpus / "part2.txt", seed=3)  # the corpus grows between runs
        runs = _wait(
            lambda: [r for r in _succeeded(store) if r.scheduled_time > first.scheduled_time],
            600, "no second run", daemon, log,
        )  # fmt: skip
        second = runs[0]
        assert daemon.poll() is None, log.read_text()[-3000:]

        history = user.run("schedule", "history", "nightly", *store_set).stdout
        for run, version in ((first, "1"), (second, "2")):
            line = next(ln for ln in history.splitlines() if run.submission_id in ln.split()[1:2])
            assert "SUCCEEDED" in line and version in line.split(), line
        client = MlflowClient(mlflow_server)
        v2 = client.get_model_version(name, "2")
        assert v2.tags["lineage.init_from"] == f"models:/{name}/1"  # continued from v1
        manifest = json.loads(Path(v2.tags["lineage.manifest_uri"]).read_text())
        added = [s["path"] for s in manifest["incremental"]["new_sources"]]
        assert [Path(p).name for p in added] == ["part2.txt"]  # only the new file

        before = {r.submission_id: r.status for r in store.history("nightly", limit=1000)}
        _stop(daemon)
        daemon = user.popen("scheduler", *store_set, log=tmp_path / "daemon2.log")
        _wait(lambda: "scheduler up" in (tmp_path / "daemon2.log").read_text(), 120,
              "the restarted daemon never came up", daemon, tmp_path / "daemon2.log")  # fmt: skip
        time.sleep(EVERY + 3)  # at least one fire and a few polls after the restart
        assert "nightly" in user.run("schedule", "list", *store_set).stdout
        user.run("schedule", "pause", "nightly", *store_set)
        after = store.history("nightly", limit=1000)
        assert before.keys() <= {r.submission_id for r in after}  # nothing lost
        times = [r.scheduled_time for r in after]
        assert len(set(times)) == len(times)  # nothing duplicated
        submitted = {r.submission_id for r in after if r.status not in ("SKIPPED",)}
        for sid in submitted:  # each on the cluster once, under its own id
            assert job_info(ray_cluster.address, ray_cluster.token, sid)["submission_id"] == sid
        for run in after:
            if run.status in ("PENDING", "RUNNING"):
                user.run("stop", run.submission_id, "--address", ray_cluster.address)
    finally:
        _stop(daemon)
