"""The ``moe-pretrain`` entry point: one typer app, one module per subcommand.

Each module in ``jobs/commands`` exposes ``register(app)``; heavy imports (torch,
ray, mlflow) happen inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import importlib
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
    try:
        app()
    except (ConfigError, PipelineError, JobError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
