"""What every step of the DAG shares: the context it runs in and the outcome it returns.

Each step returns a ``StepOutcome`` naming what it produced, which is what
the next step's fingerprint hashes: a forced rerun upstream gives new
outputs, so everything downstream reruns too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from jobs.service.steps.cache import StepCache
from jobs.service.tracking import Runs


@dataclass
class Context:
    cfg: Any  # RootConfig
    runs: Runs
    cache: StepCache
    parent_run_id: str | None = None
    force: frozenset[str] = frozenset()
    lineage: dict[str, str] = field(default_factory=dict)


@dataclass
class StepOutcome:
    name: str
    cache_hit: bool
    fingerprint: str
    run_id: str | None
    outputs: dict[str, Any]


def join_job_cluster() -> None:
    """Inside a Ray job (``RAY_ADDRESS`` set), join that cluster before any step runs.

    Elsewhere nothing starts here: the steps that need Ray (a prepare or a
    training that is not cached) start a local one, never ``address="auto"``,
    so a cluster some ``ray start`` left on this machine never gets work by
    accident, and a fully cached rerun starts no Ray at all.
    """
    import ray

    if os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
