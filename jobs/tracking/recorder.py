"""An in-memory tracker: keeps every metric dict the training loop logs (benches read it back)."""

from __future__ import annotations

from jobs.tracking.base import NullTracker


class Recorder(NullTracker):
    """Keeps every metric dict the loop logs; ``create()`` makes it a tracking spec."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []

    def create(self) -> Recorder:
        return self

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logs.append((step, dict(metrics)))
