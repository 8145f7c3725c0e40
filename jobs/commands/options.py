"""Options every subcommand shares: ``--config FILE.yaml``, repeatable ``--set key=value``.

And the one way a subcommand's own flags become ``--set`` items.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see configs/).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set train.lr=3e-4 (repeatable)."),
]


def flags_as_overrides(flags: Mapping[str, Any]) -> list[str]:
    """``{config key: flag value}`` as ``--set`` items (JSON values), the unset flags left out.

    A subcommand's own flags are shorthands for config keys; their items go after the
    user's ``--set`` ones, so a flag wins.
    """
    return [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
