"""Options every subcommand shares: ``--config FILE.yaml`` and repeatable ``--set key=value``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key: --set train.lr=3e-4 (repeatable)."),
]
