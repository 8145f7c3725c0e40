"""Ray job submission against a real ``ray start --head`` cluster with token auth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.errors import JobError
from jobs.service import submit
from jobs.service.config import ClusterConfig

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.service", *args],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300,
    )  # fmt: skip


def wait_done(address: str, sid: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = submit.job_info(address, sid).status
        if status in submit.TERMINAL:
            return status
        time.sleep(1)
    raise TimeoutError(f"job {sid} still {status}")


@pytest.fixture
def authed(ray_cluster, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_cluster.token)
    return ray_cluster


def test_submit_status_logs_of_a_run(authed, tmp_path):
    """``submit`` ships the working dir and the config; the job runs ``run`` on the cluster.

    The config names a corpus that does not exist there, so the job's own CLI
    fails fast with its one-line error: status FAILED, the error in the logs.
    A credential in the config is not shipped.
    """
    config = tmp_path / "job.yaml"
    missing = "/nonexistent/corpus-for-submit-test"
    config.write_text(yaml.safe_dump({"data": {"inputs": [missing]}}))
    env = {"RAY_AUTH_TOKEN": authed.token}
    out = cli(
        "submit", "--address", authed.address, "--config", str(config),
        "--set", "data.s3.secret=hunter2", "--set", "storage.root=/tmp/moe-submit-test",
        "--set", "cluster.env_vars.AWS_SECRET_ACCESS_KEY=hunter2",
        "--set", "cluster.env_vars.MOE_MIRROR=https://u:hunter2@mirror.example",
        env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    sid = out.stdout.strip().splitlines()[-1]
    assert "data.s3.secret not shipped" in out.stderr
    assert "MOE_MIRROR shipped without the credentials" in out.stderr

    assert wait_done(authed.address, sid) == "FAILED"
    status = cli("status", sid, "--address", authed.address, env=env)
    assert status.stdout.strip().splitlines()[-1] == "FAILED"
    logs = cli("logs", sid, "--address", authed.address, env=env).stdout
    assert "error:" in logs and missing in logs
    info = submit.client(authed.address).get_job_info(sid)
    shipped = json.dumps([info.entrypoint, info.runtime_env, info.metadata])
    assert "hunter2" not in shipped and "mirror.example" in shipped
    followed: list[str] = []
    submit.follow_logs(authed.address, sid, write=followed.append)
    assert missing in "".join(followed)


def test_stop_duplicate_id_and_auth(authed, monkeypatch, tmp_path):
    c = submit.client(authed.address)
    sid = c.submit_job(entrypoint="python -c 'import time; time.sleep(120)'")
    while submit.job_info(authed.address, sid).status != "RUNNING":
        time.sleep(0.5)
    out = cli("stop", sid, "--address", authed.address, env={"RAY_AUTH_TOKEN": authed.token})
    assert out.stdout.strip() == "stopping", out.stderr[-2000:]
    assert wait_done(authed.address, sid, timeout=60) == "STOPPED"

    cluster = ClusterConfig(working_dir=str(tmp_path))
    tree = {"data": {"inputs": ["/nonexistent"]}}
    submit.submit_run(tree, cluster, authed.address, submission_id="fixed-id-1")
    with pytest.raises(submit.DuplicateSubmission):
        submit.submit_run(tree, cluster, authed.address, submission_id="fixed-id-1")

    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-token")
    with pytest.raises(JobError, match="RAY_AUTH_TOKEN"):
        submit.job_info(authed.address, sid)


def test_address_is_never_guessed(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(JobError, match="no cluster address"):
        submit.resolve_address(None, ClusterConfig())
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(JobError, match="no cluster address"):
        submit.resolve_address(None, ClusterConfig())
    assert submit.resolve_address("http://h:8265/", ClusterConfig()) == "http://h:8265"


def test_runtime_env_carries_working_dir_and_deps(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cluster = ClusterConfig(working_dir=str(tmp_path), install_project_deps=True, pip=["rich"])
    env = submit.runtime_env(cluster, "sid-1")
    assert env["working_dir"] == str(tmp_path.resolve())
    assert ".venv" in env["excludes"] and "outputs" in env["excludes"]
    assert any(r.startswith("torch") for r in env["pip"]) and env["pip"][-1] == "rich"
    assert not any("pytest" in r for r in env["pip"])  # the dev extra stays home
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert env["env_vars"][submit.SUBMISSION_ENV] == "sid-1"
