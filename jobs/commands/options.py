"""Options every subcommand shares: ``--config FILE.yaml`` and repeatable ``--set key=value``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see configs/).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set train.lr=3e-4 (repeatable)."),
]
