"""What the pipeline logs to a real MLflow server holds no secret: a config tree with planted
credentials (secret fields, credential-named keys, URIs with passwords) goes through both
logging paths (the trainer's ``MlflowTracker`` and the pipeline's ``Runs``, ``ClientTracker``s), and nothing
planted can be found in the run's params, tags or run name afterwards."""

from __future__ import annotations

import pytest

from jobs.config import RootConfig
from jobs.service import tracking as service
from jobs.settings import load_config
from jobs.tracking import mlflow_tracker as tracking

PLANTED = "PLANTED"

pytestmark = pytest.mark.slow


def _config_with_secrets() -> RootConfig:
    return load_config(
        RootConfig,
        overrides=[
            f"data.s3.key=AKIA{PLANTED}1",
            f"data.s3.secret={PLANTED}2",
            f"data.inputs=[s3://user:{PLANTED}3@bucket/corpus]",
            f"tracking.uri=http://pipeline:{PLANTED}4@mlflow:5000",
            "train.keep_last_k=2",
        ],
    )


EXTRA = {
    "hf_token": f"hf_{PLANTED}5",
    "nested": {"db_password": f"{PLANTED}6", "api_key": f"{PLANTED}7"},
    "endpoint": f"https://u:{PLANTED}8@host/x?X-Amz-Signature={PLANTED}9&part=1",
    "tokenizer": "tokenizer.json",
    "vocab_size": 8192,
}
TAGS = {
    "dataset_uri": f"s3://AKIA:{PLANTED}10@bucket/datasets/x",
    "auth_token": f"{PLANTED}11",
    "checkpoint_uri": "s3://bucket/checkpoints/step-10",
}


def _everything_logged(client, run_id: str) -> dict[str, str]:
    run = client.get_run(run_id)
    return {**run.data.params, **run.data.tags, "run_name": run.info.run_name or ""}


def _assert_clean(logged: dict[str, str]) -> None:
    leaks = {k: v for k, v in logged.items() if PLANTED in k or PLANTED in v}
    assert not leaks, f"secrets reached MLflow: {leaks}"
    assert logged["train.keep_last_k"] == "2" and logged["tokenizer"] == "tokenizer.json"
    assert logged["vocab_size"] == "8192"
    assert logged["checkpoint_uri"] == "s3://bucket/checkpoints/step-10"
    assert logged["dataset_uri"] == "s3://***@bucket/datasets/x"


def test_the_trainers_tracker_logs_no_secret(mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    tracker = tracking.MlflowTracker(
        uri=mlflow_uri,
        experiment="security",
        run_name="tracker-secrets",
        system_metrics=False,
        retry_interval_s=0.5,
        spool_dir=str(tmp_path / "spool"),
    )
    tracker.log_params({**_config_with_secrets().model_dump(mode="json"), **EXTRA})
    tracker.set_tags(TAGS)
    tracker.close()
    assert tracker.run_id
    _assert_clean(_everything_logged(MlflowClient(mlflow_uri), tracker.run_id))


def test_the_pipelines_runs_log_no_secret(mlflow_uri):
    cfg = _config_with_secrets().model_copy(update={"tracking": RootConfig().tracking})
    runs = service.Runs(cfg)
    run = runs.start("pipeline-secrets", dict(TAGS))
    run.log_params({**_config_with_secrets().model_dump(mode="json"), **EXTRA})
    run.set_tags({"note": "ok", "source": f"https://x:{PLANTED}12@git/repo"})
    run.close()
    _assert_clean(_everything_logged(runs.client, run.run_id))


@pytest.mark.parametrize("password", [PLANTED, PLANTED + "x" * 300], ids=["short", "long"])
def test_the_tracker_never_logs_the_tracking_uris_userinfo(password, tmp_path, caplog):
    """A server that is down makes the tracker warn, naming the server without its password
    (also when the error quoting the URI is cut short: redacted first, then cut)."""
    from servers import free_port

    from jobs.tracking.mlflow_tracker import MlflowTracker

    uri = f"http://pipeline:{password}@127.0.0.1:{free_port()}"
    with caplog.at_level("WARNING", logger="jobs.tracking.mlflow_tracker"):
        tracker = MlflowTracker(
            uri=uri, experiment="security", run_name="uri-secrets", system_metrics=False,
            retry_interval_s=0.1, close_timeout_s=0.5, spool_dir=str(tmp_path / "spool"),
        )  # fmt: skip
        tracker.log({"train/loss": 1.0}, step=1)
        tracker.close()
    assert "unreachable" in caplog.text and "127.0.0.1" in caplog.text
    assert PLANTED not in caplog.text
