"""The driver's progress bar: step/total, loss, tokens/s, ETA.

Rank 0 pushes its latest numbers to a tiny actor (fire and forget, so a slow
driver never slows training); the driver polls it while ``fit()`` runs.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_sink_actor():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressSink:
        def __init__(self) -> None:
            self.latest: dict[str, Any] | None = None

        def push(self, update: dict[str, Any]) -> None:
            self.latest = update

        def get(self) -> dict[str, Any] | None:
            return self.latest

    return ProgressSink.remote()


class ProgressBar:
    def __init__(self, total: int, description: str = "train", enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, loss="-", tps="-")

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, update: dict[str, Any] | None) -> None:
        if not update:
            return
        loss, tps = update.get("loss", math.nan), update.get("tokens_per_s", math.nan)
        self.progress.update(
            self.task,
            completed=update["step"],
            total=update.get("max_steps"),
            loss=f"{loss:.4f}" if math.isfinite(loss) else "-",
            tps=f"{tps:,.0f}" if math.isfinite(tps) else "-",
        )
