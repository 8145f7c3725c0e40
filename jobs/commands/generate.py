"""``moe-pretrain generate``: sample from a registered model (or an HF folder)."""

from __future__ import annotations

import typer

from jobs.commands.options import ConfigOpt, SetOpt


def generate(
    model: str = typer.Option(
        ..., "--model", help="models:/NAME@champion, models:/NAME/3 or a folder."
    ),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int | None = typer.Option(None, "--seed", help="Seeds sampling (temperature > 0)."),
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the prompt and its continuation."""
    from jobs.service.hf_folder import generate_text, load_model
    from jobs.settings import load_root_config
    from jobs.tracking import resolve_tracking_uri

    cfg = load_root_config(config, set_)
    loaded = load_model(model, resolve_tracking_uri(cfg.tracking.uri))
    text = generate_text(loaded, prompt, max_new_tokens, temperature, top_p, seed)
    typer.echo(prompt + text)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
