"""What the service's subcommands share: loading the config tree, printing tables."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import typer

from jobs.settings import ConfigError, apply_overrides, build, read_yaml


def raw_tree(config: Path | None, sets: list[str] | None) -> dict[str, Any]:
    """The YAML plus ``--set`` overrides, before validation: what a submitted job receives."""
    tree = read_yaml(config) if config else {}
    return apply_overrides(tree, list(sets or []))


def load_root(config: Path | None, sets: list[str] | None, config_json: str | None = None):
    """The validated ``RootConfig``; ``config_json`` is the inline tree a submitted job gets."""
    from jobs.config import RootConfig

    if config_json is not None:
        try:
            tree = json.loads(config_json)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config-json: not valid JSON ({e.msg})") from None
        tree = apply_overrides(tree, list(sets or []))
    else:
        tree = raw_tree(config, sets)
    return build(RootConfig, copy.deepcopy(tree))


def echo_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A plain aligned table on stdout (greppable, no box drawing)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    for line in [headers, *cells]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
