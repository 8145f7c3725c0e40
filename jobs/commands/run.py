"""``moe-pretrain run``: prepare -> train -> evaluate -> register; last stdout line = model URI."""

from __future__ import annotations

from typing import Annotated

import typer

from jobs.commands.options import ConfigOpt, SetOpt

ForceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--force",
        "-f",
        help="Rerun a step even if cached: prepare, train, evaluate, register (repeatable).",
    ),
]
ConfigJsonOpt = Annotated[
    str | None,
    typer.Option("--config-json", hidden=True, help="Inline config tree (submitted jobs)."),
]


def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = None,
    config_json: ConfigJsonOpt = None,
) -> None:
    """Run the whole pipeline as one tracked MLflow run; cached steps are skipped."""
    from jobs.service.dag import check_force, run_pipeline
    from jobs.settings import load_root_config, tree_from_json

    cfg = load_root_config(config, set_, base=tree_from_json(config_json))
    result = run_pipeline(cfg, force=check_force(force or ()))
    for step in result.steps:
        state = "cache hit" if step.cache_hit else "ran"
        typer.echo(f"{step.name:<9} {state:<9} {step.fingerprint}", err=True)
    for key in ("val/loss", "heldout/loss", "val/perplexity"):
        if key in result.metrics:
            typer.echo(f"{key} = {result.metrics[key]:.4f}", err=True)
    if result.cache_hits.get("register"):
        champion = "registered by an earlier run (cache hit)"
    else:
        champion = "became champion" if result.became_champion else "champion unchanged"
    typer.echo(f"pipeline run {result.parent_run_id}; {champion}", err=True)
    typer.echo(result.model_uri)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
