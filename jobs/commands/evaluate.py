"""``moe-pretrain evaluate``: score a checkpoint or a registered model on the eval sets."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from jobs.commands.options import ConfigOpt, SetOpt

CheckpointOpt = Annotated[
    str | None, typer.Option("--checkpoint", help="Training checkpoint dir (local or s3://).")
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="models:/NAME/VERSION, models:/NAME@ALIAS or a folder."),
]
DatasetOpt = Annotated[
    str | None,
    typer.Option(
        "--dataset", help="Dataset folder; default: the checkpoint's, or data.* prepared."
    ),
]


def evaluate(
    checkpoint: CheckpointOpt = None,
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Val (and held-out) loss, perplexity, expert load and samples, logged to an MLflow run."""
    from jobs.service.steps.standalone import evaluate_only
    from jobs.settings import load_root_config

    cfg = load_root_config(config, set_)
    result, run_id = evaluate_only(cfg, checkpoint=checkpoint, model=model, dataset=dataset)
    for s in result.samples:
        typer.echo(f"{s['prompt']!r} -> {s['completion']!r}", err=True)
    typer.echo(f"logged to MLflow run {run_id}", err=True)
    typer.echo(json.dumps(result.metrics, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
