"""A real ``mlflow server --app-name basic-auth``: who gets in, and what a reader may not do.

The server runs as the compose stack and the Kubernetes Deployment run it: basic auth,
``default_permission = READ``, ``--allowed-hosts`` set, and the pipeline's user created
by ``infra/mlflow/bootstrap_users.py``.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
BOOTSTRAP = Path(__file__).resolve().parents[2] / "infra" / "mlflow" / "bootstrap_users.py"

pytestmark = pytest.mark.slow


def _bootstrap(server, username: str, password: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/bin:/bin",
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_AUTH_ADMIN_USERNAME": server.admin[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": server.admin[1],
        "MLFLOW_TRACKING_USERNAME": username,
        "MLFLOW_TRACKING_PASSWORD": password,
    }
    return subprocess.run(
        [sys.executable, str(BOOTSTRAP)], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def users(mlflow_auth_server):
    """The pipeline user (made by the bootstrap script) and a reader (default READ only)."""
    pipeline = ("pipeline", secrets.token_hex(12))
    reader = ("reader", secrets.token_hex(12))
    for user in (pipeline, reader):
        done = _bootstrap(mlflow_auth_server, *user)
        assert done.returncode == 0, done.stderr
    return {"pipeline": pipeline, "reader": reader}


def _as(monkeypatch, server, user: tuple[str, str]):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def test_unauthenticated_and_wrong_password_are_refused(mlflow_auth_server, users, http_status):
    url = mlflow_auth_server.uri + SEARCH
    assert http_status("GET", url) == 401
    assert http_status("GET", url, auth=(users["reader"][0], "wrong-password")) == 401
    assert http_status("GET", url, auth=users["reader"]) == 200
    assert http_status("GET", mlflow_auth_server.uri + "/health") == 200


def test_a_host_header_outside_allowed_hosts_is_refused(mlflow_auth_server, users, http_status):
    url = mlflow_auth_server.uri + SEARCH
    rebinding = {"Host": f"attacker.example:{mlflow_auth_server.port}"}
    assert http_status("GET", url, auth=users["reader"], headers=rebinding) == 403
    allowed = {"Host": f"localhost:{mlflow_auth_server.port}"}
    assert http_status("GET", url, auth=users["reader"], headers=allowed) == 200


def test_bootstrap_is_rerunnable_and_rotates_the_password(mlflow_auth_server, http_status):
    url = mlflow_auth_server.uri + SEARCH
    old, new = secrets.token_hex(12), secrets.token_hex(12)
    first = _bootstrap(mlflow_auth_server, "rotating", old)
    second = _bootstrap(mlflow_auth_server, "rotating", new)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert "created" in first.stdout and "updated" in second.stdout
    assert http_status("GET", url, auth=("rotating", old)) == 401
    assert http_status("GET", url, auth=("rotating", new)) == 200


def test_bootstrap_with_a_wrong_admin_password_fails(mlflow_auth_server):
    server = type(mlflow_auth_server)(
        uri=mlflow_auth_server.uri,
        port=mlflow_auth_server.port,
        admin=("admin", "not-the-password"),
        root=mlflow_auth_server.root,
    )
    done = _bootstrap(server, "intruder", secrets.token_hex(12))
    assert done.returncode == 1
    assert "HTTP 401" in done.stderr


def test_the_pipeline_logs_with_credentials_from_the_environment(
    mlflow_auth_server, users, monkeypatch, tmp_path
):
    """The pipeline's parent run (``Runs``) and the trainer's tracker, as the pipeline user:
    MLflow's client reads MLFLOW_TRACKING_USERNAME/PASSWORD itself, nothing else is needed."""
    from jobs.config import RootConfig
    from jobs.service.tracking import Runs
    from jobs.tracking.mlflow_tracker import MlflowTracker

    client = _as(monkeypatch, mlflow_auth_server, users["pipeline"])
    experiment = f"auth-{secrets.token_hex(4)}"
    cfg = RootConfig.model_validate(
        {"tracking": {"uri": mlflow_auth_server.uri, "experiment": experiment}}
    )
    runs = Runs(cfg)
    parent_run = runs.start("pipeline", {"moe.stage": "pipeline"})
    parent = parent_run.run_id
    parent_run.log_params({"train": {"lr": 3e-4}})
    tracker = MlflowTracker(
        uri=mlflow_auth_server.uri,
        experiment=experiment,
        run_name="train",
        parent_run_id=parent,
        system_metrics=False,
        retry_interval_s=0.5,
        spool_dir=str(tmp_path / "spool"),
    )
    tracker.log({"train/loss": 1.5}, step=1)
    tracker.close()
    parent_run.close()
    assert tracker.run_id, "the tracker never reached the authenticated server"
    assert client.get_run(parent).data.params == {"train.lr": "0.0003"}
    train = client.get_run(tracker.run_id).data
    assert train.metrics == {"train/loss": 1.5} and train.tags["mlflow.parentRunId"] == parent


def test_a_rotated_password_spools_the_running_jobs_metrics(
    mlflow_auth_server, users, monkeypatch, tmp_path, caplog
):
    """The pipeline's password rotated under a running job: every request is refused (401),
    the tracker keeps spooling, warns once and says so at the end; the run's next start, with
    the new password, delivers everything exactly once."""
    from jobs.tracking.mlflow_tracker import MlflowTracker
    from jobs.tracking.spool import Spool

    client = _as(monkeypatch, mlflow_auth_server, users["pipeline"])
    spool = str(tmp_path / "runs" / "r" / "mlflow-spool")
    opts = {
        "uri": mlflow_auth_server.uri, "experiment": f"rotated-{secrets.token_hex(4)}",
        "run_key": "r", "system_metrics": False, "retry_interval_s": 0.2, "spool_uri": spool,
    }  # fmt: skip
    tracker = MlflowTracker(**opts)
    tracker.log({"train/loss": 1.0}, step=1)
    assert tracker.flush(timeout=30) and tracker.delivered == 1
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "the-old-password")
    with caplog.at_level("WARNING", logger="jobs.tracking.mlflow_tracker"):
        for step in range(2, 6):
            tracker.log({"train/loss": float(step)}, step)
        assert tracker.flush(timeout=30)  # in the spool
        tracker.close()
    assert tracker.refused == 401 and tracker.dropped == 0
    assert caplog.text.count("refused our credentials (HTTP 401)") == 1
    assert f"4 metrics spooled at {spool}, not delivered: MLflow refused our credentials" in (
        caplog.text
    )
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", users["pipeline"][1])
    again = MlflowTracker(**opts)
    again.close()
    assert again.run_id == tracker.run_id and again.delivered == 4
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 6)]
    assert Spool(spool).segments() == []


def test_a_reader_cannot_register_or_promote_a_model(mlflow_auth_server, users, monkeypatch):
    from mlflow.exceptions import MlflowException

    owner = _as(monkeypatch, mlflow_auth_server, users["pipeline"])
    name = f"moe-{secrets.token_hex(4)}"
    owner.create_registered_model(name)
    run = owner.create_run(owner.create_experiment(f"reg-{secrets.token_hex(4)}"))
    version = owner.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    owner.set_registered_model_alias(name, "champion", version.version)

    reader = _as(monkeypatch, mlflow_auth_server, users["reader"])
    assert reader.get_registered_model(name).name == name  # READ is not "no access"
    attempts = {
        "new version": lambda: reader.create_model_version(
            name, f"runs:/{run.info.run_id}/model", run.info.run_id
        ),
        "alias": lambda: reader.set_registered_model_alias(name, "champion", version.version),
        "delete": lambda: reader.delete_registered_model(name),
    }
    for what, attempt in attempts.items():
        with pytest.raises(MlflowException) as err:
            attempt()
        assert err.value.error_code == "PERMISSION_DENIED", what
    assert owner.get_model_version_by_alias(name, "champion").version == version.version
    assert len(owner.search_model_versions(f"name='{name}'")) == 1


def test_bootstrap_script_names_every_missing_variable():
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(BOOTSTRAP)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in done.stderr and "MLFLOW_TRACKING_URI" in done.stderr
