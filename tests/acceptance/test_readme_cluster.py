"""The README's cluster section, command by command, as a user's first cluster job: a
one-file corpus whose vocabulary differs from the preset's, a Ray head with Ray's own token
auth and no variable exported; the job succeeds and its credentials stay home."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.acceptance.conftest import REPO, book, job_config, job_info

pytestmark = pytest.mark.slow


def readme_block(heading: str) -> list[list[str]]:
    """The commands of the first ``bash`` block under ``heading``, comments dropped."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line]


def test_the_readme_cluster_section_runs_a_first_job_that_succeeds_and_ships_no_secret(
    user, ray_cluster, mlflow_server, tmp_path
):
    commands = readme_block("### On a Ray cluster")
    # The cluster fixture runs the first two as written, adding only its private ports.
    assert commands[0] == ["ray", "get-auth-token", "--generate"]
    assert commands[1] == ["ray", "start", "--head"]
    corpus = book(tmp_path / "alice.txt", seed=1)
    config = job_config(
        tmp_path, [str(corpus)], cluster={"env_vars": {"AWS_SECRET_ACCESS_KEY": "PLANTED-1"}}
    )
    mine = {"http://127.0.0.1:8265": ray_cluster.address, "my.yaml": str(config)}
    submit, status, logs = ([mine.get(a, a) for a in c] for c in commands[2:])
    assert submit[0] == status[0] == logs[0] == "moe-pretrain"

    out = user.run(*submit[1:], "--set", "data.s3.secret=PLANTED-2")
    sid = out.stdout.strip().splitlines()[-1]
    assert "cluster.env_vars.AWS_SECRET_ACCESS_KEY" in out.stderr and "PLANTED" not in out.stderr
    with_id = lambda cmd: [sid if a == "<id>" else a for a in cmd[1:]]  # noqa: E731
    user.wait_job(sid, ray_cluster.address)
    state = user.run(*with_id(status)).stdout.strip().splitlines()[-1]
    printed = user.run(*with_id(logs)).stdout
    assert state == "SUCCEEDED", printed[-4000:]

    tree = yaml.safe_load(config.read_text())
    name = tree["registry"]["model_name"]
    assert f"models:/{name}/1" in [line.strip() for line in printed.splitlines()]
    client = MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    exp = client.get_experiment_by_name(tree["tracking"]["experiment"])
    assert client.search_runs([exp.experiment_id], "metrics.`val/loss` > 0"), "no val/loss"
    version = client.get_model_version(name, "1")
    manifest = json.loads(Path(version.tags["lineage.manifest_uri"]).read_text())
    assert manifest["name"] == "alice"  # named after its input, not a built-in corpus
    assert manifest["val_split"]["method"] == "train_tail"  # one document, and still a val set
    hf_config = client.download_artifacts(version.run_id, "model/config.json", str(tmp_path))
    assert json.loads(Path(hf_config).read_text())["vocab_size"] == 1024  # the dataset's, not 512

    shown = json.dumps(job_info(ray_cluster.address, ray_cluster.token, sid))
    assert "PLANTED" not in shown, "a credential reached the job's entrypoint or runtime_env"
    assert "PLANTED" not in printed
