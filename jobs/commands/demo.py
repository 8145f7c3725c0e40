"""``moe-pretrain demo``: the main job on embedded defaults (what ``make demo`` runs)."""

from __future__ import annotations

import typer


def demo() -> None:
    """Run the whole pipeline on the built-in corpus with local Ray, MLflow and storage."""
    raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command()(demo)
