"""``moe-pretrain register``: evaluate a checkpoint and publish it to the model registry."""

from __future__ import annotations

import typer

from jobs.commands.evaluate import DatasetOpt
from jobs.commands.options import ConfigOpt, SetOpt


def register_cmd(
    checkpoint: str = typer.Option(
        ..., "--checkpoint", help="Training checkpoint dir (local or s3://)."
    ),
    dataset: DatasetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Register a checkpoint as HF files (alias candidate); the gate may make it champion."""
    from jobs.service.steps.standalone import register_only
    from jobs.settings import load_root_config

    cfg = load_root_config(config, set_)
    outcome = register_only(cfg, checkpoint=checkpoint, dataset=dataset)
    decision = outcome.outputs.get("decision")
    if decision is not None:
        typer.echo(f"gate: {decision.reason}", err=True)
    typer.echo(f"models:/{outcome.outputs['name']}/{outcome.outputs['version']}")


def register(app: typer.Typer) -> None:
    app.command("register")(register_cmd)
