"""Live progress of ``prepare`` on stderr (stdout stays for the summary and the URI)."""

from __future__ import annotations

import time
from typing import Any


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None
        self._start = time.monotonic()
        self._last = 0.0

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress as RichProgress
            from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("listing", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def status(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def update(self, assembler: Any) -> None:
        now = time.monotonic()
        if self._bar is None or now - self._last < 0.2:
            return
        self._last = now
        tokens = sum(p.tokens_in for p in assembler.packers.values())
        rate = tokens / max(now - self._start, 1e-9)
        self.status(
            f"records {assembler.records_in:,}  documents {assembler.kept:,}  "
            f"quarantined {sum(assembler.quarantine.by_reason.values()):,}  "
            f"duplicates {assembler.dedup.removed:,}  tokens {tokens:,} ({rate:,.0f}/s)"
        )
