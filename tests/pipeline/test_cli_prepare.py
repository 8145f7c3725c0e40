"""``moe-pretrain prepare``: flags map onto the config tree, last stdout line is the URI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from jobs.commands import prepare as prepare_cmd
from jobs.commands.prepare import flag_overrides
from pipeline.reader import DatasetReader

REPO = Path(__file__).resolve().parents[2]


def test_flags_become_config_overrides():
    items = flag_overrides(["a.txt", "s3://b/c"], "s3://out", 128, 4096)
    assert items == [
        'data.inputs=["a.txt", "s3://b/c"]',
        'storage.root="s3://out"',
        "data.seq_len=128",
        "data.vocab_size=4096",
    ]


@pytest.mark.slow
def test_cli_prints_summary_then_the_dataset_uri(ray_local, clean_corpus, tmp_path):
    app = typer.Typer()
    prepare_cmd.register(app)
    app.command("noop")(lambda: None)
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  name: tiny\n  shard_rows: 8\n  val_fraction: 0.25\n")
    args = ["prepare", "-c", str(config), "-i", str(clean_corpus), "-o", str(tmp_path / "out"),
            "--seq-len", "31", "--vocab-size", "300", "--set", "data.batch_size=4", "-q"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    uri = lines[-1]
    assert (Path(uri) / "manifest.json").is_file()
    ds = DatasetReader(uri)
    assert ds.seq_len == 31 and ds.vocab_size == 300 and ds.manifest["name"] == "tiny"
    assert any("duplicates removed 1" in line for line in lines)
    again = CliRunner().invoke(app, args)
    assert "cache hit" in again.stdout and again.stdout.strip().splitlines()[-1] == uri
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert "cache hit" not in forced.stdout and forced.stdout.strip().splitlines()[-1] == uri


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seq-len", "0"], "error: config key 'data.seq_len'"),
        (["--input", "/definitely/not/here"], "error: input '/definitely/not/here'"),
        (["--set", "data.txt_split=lines"], "error: config key 'data.txt_split'"),
        (
            ["--set", "model.max_seq_len=64", "--set", "train.sample_max_new_tokens=64"],
            "error: config key 'train.sample_max_new_tokens': must be below model.max_seq_len (64)",
        ),
    ],
)
def test_bad_config_is_one_line_and_exit_2(args, message):
    proc = subprocess.run(
        [sys.executable, "-c", "from jobs.cli import main; main()", "prepare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""
