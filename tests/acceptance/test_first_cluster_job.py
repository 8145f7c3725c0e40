"""A user's first cluster job: a one-file corpus, submitted to a Ray head with Ray's own
token auth, with no variable exported; it succeeds and its credentials stay home."""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow import MlflowClient

from tests.acceptance.conftest import book, job_config, job_info

pytestmark = pytest.mark.slow


def test_a_one_file_corpus_job_succeeds_registers_a_champion_and_ships_no_secret(
    user, ray_cluster, mlflow_server, tmp_path
):
    corpus = book(tmp_path / "alice.txt", seed=1)
    config = job_config(
        tmp_path, [str(corpus)], cluster={"env_vars": {"AWS_SECRET_ACCESS_KEY": "PLANTED-1"}}
    )
    out = user.run("submit", "--address", ray_cluster.address, "--config", str(config),
                   "--set", "data.s3.secret=PLANTED-2")  # fmt: skip
    sid = out.stdout.strip().splitlines()[-1]
    assert "cluster.env_vars.AWS_SECRET_ACCESS_KEY" in out.stderr and "PLANTED" not in out.stderr

    status = user.wait_job(sid, ray_cluster.address)
    logs = user.run("logs", sid, "--address", ray_cluster.address).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    cfg = yaml.safe_load(config.read_text())
    name = cfg["registry"]["model_name"]
    assert f"models:/{name}/1" in logs

    client = MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1"
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    trained = client.search_runs([exp.experiment_id], "metrics.`val/loss` > 0")
    assert trained, "no run logged val/loss"
    assert (tmp_path / "outputs" / "datasets" / "alice").is_dir()  # named after its input

    shown = json.dumps(job_info(ray_cluster.address, ray_cluster.token, sid))
    assert "PLANTED" not in shown, "a credential reached the job's entrypoint or runtime_env"
    assert "PLANTED" not in logs
