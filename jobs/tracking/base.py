"""The ``Tracker`` interface, its no-op implementation and tracking-URI resolution."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class Tracker(Protocol):
    @property
    def run_id(self) -> str | None:
        """The MLflow run, once there is one (None for a tracker that tracks nothing)."""
        ...

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def flush(self, timeout: float = 10.0) -> bool:
        """Deliver (or spool durably) what was logged so far; False if that timed out."""
        ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """What every rank but 0 gets, and what runs without tracking use."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def flush(self, timeout: float = 10.0) -> bool:
        return True

    def close(self, status: str = "FINISHED") -> None:
        pass


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """Explicit argument or config ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > local SQLite."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = value
    return out
