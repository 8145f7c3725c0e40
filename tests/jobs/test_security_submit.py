"""What ``submit`` and the scheduler send to the Ray job server (``build_submission``)
carries no credential: not by key, not inside a value, not from this process's environment."""

from __future__ import annotations

import json

import pytest

from jobs.service.submit import build_submission, withheld_lines
from jobs.settings import load_root_config, raw_tree

PLANTED = "PLANTED"


def test_a_submission_ships_no_credential_and_names_what_it_withheld(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://pipeline:{PLANTED}1@mlflow:5000")
    overrides = [
        f"cluster.working_dir={tmp_path}",
        f"cluster.env_vars.AWS_SECRET_ACCESS_KEY={PLANTED}2",
        "cluster.env_vars.LOG_LEVEL=info",
        f"cluster.env_vars.HF_ENDPOINT=https://u:{PLANTED}3/x@hf.example",
        f'cluster.pip=["numpy", "git+https://ghp_{PLANTED}4@github.com/o/r.git"]',
        f"data.s3.endpoint_url=http://minio:9000/?X-Amz-Signature={PLANTED}5",
        f"data.s3.secret={PLANTED}6",
        "train.max_steps=7",
    ]
    tree, cfg = raw_tree(None, overrides), load_root_config(None, overrides)
    job = build_submission(tree, cfg.cluster, "sid-1", {"note": f"https://x:{PLANTED}7@h"})

    assert PLANTED not in json.dumps([job.entrypoint, job.runtime_env, job.metadata])
    env_vars = job.runtime_env["env_vars"]
    assert env_vars["LOG_LEVEL"] == "info" and "AWS_SECRET_ACCESS_KEY" not in env_vars
    assert env_vars["HF_ENDPOINT"] == "https://hf.example"
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert job.runtime_env["pip"] == ["numpy", "git+https://github.com/o/r.git"]
    assert '"max_steps": 7' in job.entrypoint and job.metadata == {"note": "https://h"}
    assert job.withheld == [
        "cluster.env_vars.AWS_SECRET_ACCESS_KEY",
        "cluster.env_vars.HF_ENDPOINT (credentials in the value)",
        "cluster.pip[1] (credentials in the value)",
        "data.s3.endpoint_url (credentials in the value)",
        "data.s3.secret",
        "$MLFLOW_TRACKING_URI (credentials in the value)",
        "metadata.note (credentials in the value)",
    ]
    lines = withheld_lines(job.withheld)
    assert (
        lines[0]
        == "cluster.env_vars.AWS_SECRET_ACCESS_KEY not shipped to the cluster (a credential)"
    )
    assert lines[2] == "cluster.pip[1] shipped without the credentials in its value"
    assert lines[-1] == "the job gets its credentials from the cluster's own environment"
    assert PLANTED not in "".join(lines)


def test_a_refused_cluster_address_is_not_echoed_with_its_credentials(capsys, monkeypatch):
    from jobs.cli import main

    address = f"ray://admin:{PLANTED}@head:10001"
    monkeypatch.setattr("sys.argv", ["moe-pretrain", "submit", "--address", address])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 2 and "ray://***@head:10001" in err and PLANTED not in err
