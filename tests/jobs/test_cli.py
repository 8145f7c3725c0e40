"""The ``moe-pretrain`` entry point itself: the environment it sets up before any command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# ``moe-pretrain --help`` through ``jobs.cli.main``, then what MLflow itself decides.
AFTER_HELP = """
import sys
import jobs.cli
sys.argv = ["moe-pretrain", "--help"]
try:
    jobs.cli.main()
except SystemExit:
    pass
import mlflow
from mlflow.telemetry import get_telemetry_client
print(os.environ.get("MLFLOW_DISABLE_TELEMETRY"), get_telemetry_client() is None)
"""


def _run_main(extra_env: dict[str, str]) -> str:
    # A user's shell: none of the CI markers (nor pytest's) that make MLflow turn telemetry off.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **extra_env}
    out = subprocess.run(
        [sys.executable, "-c", "import os\n" + AFTER_HELP],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_the_cli_turns_mlflow_telemetry_off_by_default():
    assert _run_main({}) == "true True"


@pytest.mark.parametrize("value", ["false", "true"])
def test_a_users_own_telemetry_setting_is_kept(value):
    assert _run_main({"MLFLOW_DISABLE_TELEMETRY": value}).split()[0] == value
