"""Secrets never leave in logs or params; paths from configs never leave the storage root;
credentials come from the environment only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from jobs.auth import check_mlflow_credentials, ray_auth_headers
from jobs.errors import JobError
from jobs.paths import PathEscapeError, ensure_within, safe_join
from jobs.train import driver
from pipeline.redaction import (
    REDACTED,
    is_secret_key,
    redact,
    redact_uri,
    split_secrets,
    strip_uri_credentials,
)

SECRET_KEYS = [
    "password", "secret", "token", "key", "credentials", "api_key", "apiKey", "hf_token",
    "aws_secret_access_key", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN",
    "data.s3.secret", "db_passwd", "basic_auth", "session-token", "PrivateKey",
    # names the first version missed (issue 11)
    "PGPASSWORD", "MYSQL_PWD", "DB_PASS", "AUTHTOKEN", "SECRETKEY", "tokens", "secrets",
    "apiKeys", "connection_string", "webhook_url", "authorization_header",
]  # fmt: skip
INNOCENT_KEYS = [
    "tokenizer", "vocab_size", "keep_last_k", "monkey", "max_tokens", "tokens_per_expert",
    "eos_token_id", "pad_token_ids", "keyboard", "RAY_AUTH_MODE", "MLFLOW_AUTH_CONFIG_PATH",
    "MLFLOW_TRACKING_USERNAME", "authorization_function", "num_tokens", "secretary",
    "special_tokens", "tokens_seen", "sample_max_new_tokens", "tokens_per_s", "PWD",
    "sort_keys", "endpoint_url", "bypass",
]  # fmt: skip


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_credential_keys_are_secret(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", INNOCENT_KEYS)
def test_innocent_keys_are_not(key):
    assert not is_secret_key(key)


def test_redact_hides_values_under_secret_keys_at_any_depth():
    config = {
        "data": {"s3": {"key": "AKIAXXXX", "secret": "s3cr3t", "endpoint": "http://minio:9000"}},
        "tracking": {"uri": "http://mlflow:5000", "password": "hunter2"},
        "tokenizer": {"vocab_size": 8192, "path": "tok.json"},
        "train": {"keep_last_k": 3, "lr": 3e-4},
        "hooks": [{"token": "t0k3n"}, "plain"],
        "api_key": SecretStr("x"),
        "empty_token": "",
    }
    out = redact(config)
    assert out["data"]["s3"] == {
        "key": REDACTED,
        "secret": REDACTED,
        "endpoint": "http://minio:9000",
    }
    assert out["tracking"] == {"uri": "http://mlflow:5000", "password": REDACTED}
    assert out["tokenizer"] == config["tokenizer"] and out["train"] == config["train"]
    assert out["hooks"] == [{"token": REDACTED}, "plain"] and out["api_key"] == REDACTED
    assert out["empty_token"] == ""  # nothing to hide; shows that it is unset
    assert config["data"]["s3"]["secret"] == "s3cr3t"  # a copy, the input is untouched


def test_credentials_inside_uris_are_redacted_wherever_they_appear():
    cases = {
        "postgresql://mlflow:pw@db:5432/mlflow": "postgresql://***@db:5432/mlflow",
        "s3://AKIA:SECRET@bucket/data": "s3://***@bucket/data",
        "https://hub/x?X-Amz-Signature=abc&X-Amz-Credential=id&part=2": (
            "https://hub/x?X-Amz-Signature=***&X-Amz-Credential=***&part=2"
        ),
        "see https://u:p@host/a and http://plain/b": "see https://***@host/a and http://plain/b",
        "http://mlflow:5000": "http://mlflow:5000",
        "s3://bucket/prefix": "s3://bucket/prefix",
    }
    for raw, expected in cases.items():
        assert redact_uri(raw) == expected
        assert redact({"uri": raw})["uri"] == expected


PLANTED = "PLANTED"
# Userinfo with "/" (AWS secret keys hold it) or "@", and query-string credentials.
HIDDEN_IN_VALUES = {
    f"s3://AKIA:ab/{PLANTED}/cd@bucket/data": ("s3://***@bucket/data", "s3://bucket/data"),
    f"https://user:p@ss{PLANTED}@host/x": ("https://***@host/x", "https://host/x"),
    f"https://acct.blob/c/f.jsonl?sv=2022&sig={PLANTED}": (
        "https://acct.blob/c/f.jsonl?sv=2022&sig=***",
        "https://acct.blob/c/f.jsonl?sv=2022",
    ),
    f"https://b.s3/k?X-Amz-Signature={PLANTED}&x-id=GetObject": (
        "https://b.s3/k?X-Amz-Signature=***&x-id=GetObject",
        "https://b.s3/k?x-id=GetObject",
    ),
    f"postgresql://db/mlflow?user=u&password={PLANTED}": (
        "postgresql://db/mlflow?user=u&password=***",
        "postgresql://db/mlflow?user=u",
    ),
    f"git+https://ghp_{PLANTED}@github.com/o/r.git": (
        "git+https://***@github.com/o/r.git",
        "git+https://github.com/o/r.git",
    ),
    "http://mlflow:5000/a@b": ("http://mlflow:5000/a@b", "http://mlflow:5000/a@b"),
    "s3://bucket/key@v1": ("s3://bucket/key@v1", "s3://bucket/key@v1"),
}


@pytest.mark.parametrize("raw", sorted(HIDDEN_IN_VALUES))
def test_userinfo_with_slash_or_at_and_query_credentials_are_caught(raw):
    redacted, stripped = HIDDEN_IN_VALUES[raw]
    assert redact_uri(raw) == redacted
    assert strip_uri_credentials(raw) == stripped


def test_split_secrets_keeps_what_works_and_names_what_was_withheld():
    tree = {
        "cluster": {
            "env_vars": {"PGPASSWORD": PLANTED, "MYSQL_PWD": PLANTED, "LOG_LEVEL": "info"},
            "pip": ["numpy", f"git+https://{PLANTED}@github.com/o/r.git"],
        },
        "data": {"s3": {"secret": PLANTED, "endpoint_url": f"http://k:{PLANTED}@minio:9000"}},
        "train": {"sample_max_new_tokens": 32, "special_tokens": {"eos": "<eos>"}},
        "hooks": {"webhook_url": f"https://hooks/x/{PLANTED}", "apiKeys": [PLANTED]},
    }
    kept, withheld = split_secrets(tree)
    assert PLANTED not in repr(kept)
    assert kept["cluster"] == {
        "env_vars": {"LOG_LEVEL": "info"},
        "pip": ["numpy", "git+https://github.com/o/r.git"],
    }
    assert kept["data"]["s3"] == {"endpoint_url": "http://minio:9000"}
    assert kept["train"] == tree["train"] and kept["hooks"] == {}
    assert withheld == [
        "cluster.env_vars.PGPASSWORD",
        "cluster.env_vars.MYSQL_PWD",
        "cluster.pip[1] (credentials in the value)",
        "data.s3.secret",
        "data.s3.endpoint_url (credentials in the value)",
        "hooks.webhook_url",
        "hooks.apiKeys",
    ]
    assert PLANTED in tree["data"]["s3"]["secret"]  # a copy, the input is untouched


def test_counts_under_token_words_are_not_credentials():
    assert redact({"tokens": 1234, "keys": 3, "tokens_list": [PLANTED]})["tokens"] == 1234
    assert redact({"tokens": [PLANTED]})["tokens"] == REDACTED
    assert redact({"PGPASSWORD": 123456})["PGPASSWORD"] == REDACTED


# --- paths ---------------------------------------------------------------------------


def test_local_paths_inside_the_root_are_normalised(tmp_path):
    root = tmp_path / "outputs"
    assert ensure_within(str(root), "datasets/a/../b") == str(root / "datasets" / "b")
    assert ensure_within(str(root), str(root / "checkpoints")) == str(root / "checkpoints")
    assert ensure_within(str(root), ".") == str(root)
    assert safe_join(str(root), "checkpoints", "run-1") == str(root / "checkpoints" / "run-1")


@pytest.mark.parametrize(
    "path", ["../escape", "datasets/../../escape", "/etc/passwd", "s3://bucket/x", "a\x00b", ""]
)
def test_local_escapes_are_refused_with_one_line_naming_the_path(tmp_path, path):
    with pytest.raises(PathEscapeError) as err:
        ensure_within(str(tmp_path / "outputs"), path)
    message = str(err.value)
    assert "\n" not in message and repr(path) in message
    assert isinstance(err.value, JobError)  # the CLI prints it as one line, exit code 2


def test_a_symlink_cannot_lead_out_of_the_root(tmp_path):
    root = tmp_path / "outputs"
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(PathEscapeError):
        ensure_within(str(root), "link/model.safetensors")


def test_a_sibling_with_a_common_prefix_is_outside(tmp_path):
    with pytest.raises(PathEscapeError):
        ensure_within(str(tmp_path / "out"), str(tmp_path / "outputs-other" / "x"))


def test_object_store_paths_stay_in_their_bucket_and_prefix():
    root = "s3://bucket/runs"
    assert ensure_within(root, "s3://bucket/runs/a/b") == "s3://bucket/runs/a/b"
    assert ensure_within(root, "ckpt/step-1") == "s3://bucket/runs/ckpt/step-1"
    assert ensure_within(root, "s3://bucket/runs/a/../b") == "s3://bucket/runs/b"
    assert ensure_within("s3://bucket", "any/where") == "s3://bucket/any/where"
    refused = [
        "s3://other/runs/a",  # another bucket
        "s3://bucket/runs-other/a",  # a prefix that merely starts the same
        "s3://bucket/elsewhere",
        "s3://bucket/runs/../elsewhere",
        "../elsewhere",
        "gs://bucket/runs/a",  # another store
        "/tmp/local",
    ]
    for path in refused:
        with pytest.raises(PathEscapeError, match="outside the storage root"):
            ensure_within(root, path)


# --- credentials from the environment ------------------------------------------------


def test_ray_token_becomes_a_bearer_header_only_when_set():
    assert ray_auth_headers({"RAY_AUTH_TOKEN": "abc"}) == {"Authorization": "Bearer abc"}
    assert ray_auth_headers({"RAY_AUTH_TOKEN": "  "}) == {}
    assert ray_auth_headers({}) == {}


def test_mlflow_credentials_come_as_a_pair():
    both = {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"}
    assert check_mlflow_credentials(both) is True
    assert check_mlflow_credentials({}) is False
    with pytest.raises(JobError, match="MLFLOW_TRACKING_PASSWORD is not"):
        check_mlflow_credentials({"MLFLOW_TRACKING_USERNAME": "u"})


def test_run_refuses_a_lone_mlflow_username_before_any_work(tmp_path):
    """``moe-pretrain run`` with half the MLflow credentials: one line naming both variables,
    exit 2, before Ray or the data are touched (the input does not even exist)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_PASSWORD"}
    env["MLFLOW_TRACKING_USERNAME"] = "pipeline"
    cli = str(Path(sys.executable).parent / "moe-pretrain")
    sets = [f"data.inputs=[{tmp_path / 'missing.txt'}]", f"storage.root={tmp_path / 'root'}"]
    done = subprocess.run(
        [cli, "run", *(f"--set={s}" for s in sets)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: MLFLOW_TRACKING_USERNAME is set but MLFLOW_TRACKING_PASSWORD is not: "
        "set both or neither"
    )
    assert not (tmp_path / "root").exists()


def test_the_trainers_tracker_refuses_a_lone_mlflow_password(monkeypatch, tmp_path):
    from jobs.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p")
    with pytest.raises(
        JobError, match="MLFLOW_TRACKING_PASSWORD is set but MLFLOW_TRACKING_USERNAME"
    ):
        MlflowTracker(uri=f"sqlite:///{tmp_path}/m.db", run_name="r", spool_dir=str(tmp_path))


def test_mlflow_client_reads_the_credentials_itself(monkeypatch):
    """What the deployments rely on: no code of ours passes MLflow credentials around."""
    from mlflow.utils.credentials import get_default_host_creds

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-the-secret")
    creds = get_default_host_creds("http://mlflow:5000")
    assert (creds.username, creds.password) == ("pipeline", "from-the-secret")


def test_the_trainer_puts_no_credential_in_a_runtime_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "PLANTED-PASSWORD")
    forwarded = driver._forwarded_env()
    assert forwarded.get("MLFLOW_TRACKING_URI") == "http://mlflow:5000"
    assert "PLANTED-PASSWORD" not in str(forwarded)


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.s3.secret:PLANTED"],
        ["data.s3.secret PLANTED.x"],
        ["=PLANTED"],
        ["tracking.uri http://u:PLANTED@mlflow"],
        ["data.s3=x", "data.s3.secret=PLANTED"],
    ],
)
def test_a_malformed_set_never_echoes_a_credential(overrides, capsys, monkeypatch, tmp_path):
    """``--set`` errors name the item or its key, never a value that could be a secret."""
    from jobs.cli import main

    monkeypatch.chdir(tmp_path)
    sets = [f"--set={o}" for o in overrides]
    monkeypatch.setattr("sys.argv", ["moe-pretrain", "run", *sets])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: --set ") and "PLANTED" not in err
