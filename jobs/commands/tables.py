"""Tables the subcommands print: plain aligned columns on stdout."""

from __future__ import annotations

from typing import Any

import typer


def echo_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A plain aligned table on stdout (greppable, no box drawing)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    for line in [headers, *cells]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
