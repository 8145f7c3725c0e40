"""The config loader: YAML + --set overrides, one-line errors naming the key."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field

from jobs.settings import (
    ConfigError,
    apply_overrides,
    load_config,
    load_root_config,
    parse_override,
    raw_tree,
    tree_from_json,
)


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-3, gt=0)
    name: str = "a"


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: Inner = Inner()
    steps: int = 10


def test_override_values_are_parsed_as_yaml():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=s3://b/p") == (["a"], "s3://b/p")
    assert parse_override("a=") == (["a"], "")


def test_overrides_win_over_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\ntrain:\n  lr: 0.1\n  name: x\n")
    cfg = load_config(Outer, f, ["train.lr=0.5", "steps=7"])
    assert (cfg.steps, cfg.train.lr, cfg.train.name) == (7, 0.5, "x")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lr=-1"], "'train.lr'"),
        (["train.typo=1"], "unknown config key 'train.typo'"),
        (["steps=many"], "'steps'"),
        (["train.lr.deep=1"], "'train.lr'"),
        (["novalue"], "expected key.path=value"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, overrides)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)


def test_apply_overrides_creates_sections():
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="'b' is a value"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.top_k=9", "config key 'model.top_k': must be <= num_experts (8), got 9"),
        ("model.hidden_size=100", "config key 'model.hidden_size': must be divisible by num_heads"),
        ("model.typo=1", "unknown config key 'model.typo'"),
        ("model.preset=huge", "config key 'model.preset': unknown name 'huge'"),
        ("train.lr=-1", "config key 'train.lr': Input should be greater than 0 (got -1)"),
        ("data.seq_len=0", "config key 'data.seq_len'"),
    ],
)
def test_root_config_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_root_config(None, [override])
    assert str(e.value).startswith(expected)
    assert "\n" not in str(e.value)


def test_the_root_loader_reads_the_file_then_the_sets(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 9\n  lr: 0.5\n")
    cfg = load_root_config(f, ["train.max_steps=3"])
    assert (cfg.train.max_steps, cfg.train.lr) == (3, 0.5)
    assert raw_tree(f, ["train.max_steps=3"]) == {"train": {"max_steps": 3, "lr": 0.5}}


def test_a_base_tree_replaces_the_file_and_is_left_as_it_was():
    base = {"train": {"max_steps": 9, "lr": 0.5}}
    cfg = load_root_config(None, ["train.max_steps=3"], base=base)
    assert (cfg.train.max_steps, cfg.train.lr) == (3, 0.5)
    assert base == {"train": {"max_steps": 9, "lr": 0.5}}


def test_config_json_is_a_tree_or_a_one_line_error():
    assert tree_from_json(None) is None
    assert tree_from_json('{"train": {"max_steps": 3}}') == {"train": {"max_steps": 3}}
    with pytest.raises(ConfigError, match=r"^--config-json: not valid JSON \("):
        tree_from_json("{")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from jobs.cli import main; main()",
            "run",
            "--set",
            "model.top_k=9",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip() == "error: config key 'model.top_k': must be <= num_experts (8), got 9"
    )


@pytest.mark.parametrize(
    "override",
    [
        "data.s3.secret=[PLANTED]",
        "cluster.env_vars.DB_PASSWORD=[PLANTED]",
        'tracking.uri=["http://pipeline:PLANTED@mlflow:5000"]',
    ],
)
def test_a_rejected_credential_is_not_echoed(override, capsys, monkeypatch, tmp_path):
    """The CLI's one-line error names the key, never the secret value it refused."""
    from jobs.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["moe-pretrain", "run", "--set", override])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: config key ")
    assert "PLANTED" not in err and override.split("=")[0] in err
