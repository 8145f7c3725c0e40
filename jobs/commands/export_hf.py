"""``moe-pretrain export-hf``: a registered model (or run artifact) as a Hugging Face folder."""

from __future__ import annotations

import typer

from jobs.commands.options import ConfigOpt, SetOpt


def export_hf(
    model: str = typer.Option(..., "--model", help="models:/NAME@champion, models:/NAME/3, ..."),
    out: str = typer.Option(..., "--out", help="Folder to write (created; must be empty)."),
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Download the safetensors, config.json and tokenizer files; prints the folder."""
    from jobs.service.hf_folder import export_folder
    from jobs.settings import load_root_config
    from jobs.tracking import resolve_tracking_uri

    cfg = load_root_config(config, set_)
    folder = export_folder(model, out, resolve_tracking_uri(cfg.tracking.uri))
    typer.echo(str(folder))


def register(app: typer.Typer) -> None:
    app.command("export-hf")(export_hf)
