"""The ``moe-pretrain`` entry point: one typer app, one module per subcommand.

Each module in ``jobs/commands`` exposes ``register(app)``; heavy imports (torch,
ray, mlflow) happen inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from jobs.errors import JobError
from jobs.settings import ConfigError
from pipeline.errors import PipelineError

COMMAND_MODULES = (
    "demo",
    "prepare",
    "train",
    "run",
    "evaluate",
    "register",
    "export_hf",
    "generate",
    "submit",
    "jobs_cmds",
    "schedule",
    "scheduler",
)

# MLflow 3 sends usage data to a third party by default, and its telemetry thread sets and
# unsets ``_MLFLOW_TELEMETRY_SESSION_ID`` in os.environ while other threads iterate os.environ
# (KeyError). Off unless the user says otherwise; the ``MLFLOW_`` prefix carries the setting
# to the training workers (``jobs.train.driver._forwarded_env``).
ENV_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true"}


def set_env_defaults() -> None:
    """``ENV_DEFAULTS`` into os.environ where the user has not set them: before mlflow is imported."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


app = typer.Typer(
    name="moe-pretrain",
    help="Pretrain Mixtral-style MoE models: prepare data, train, evaluate, register.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"jobs.commands.{_name}").register(app)


def main() -> None:
    set_env_defaults()
    try:
        app()
    except (ConfigError, PipelineError, JobError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
