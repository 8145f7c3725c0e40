"""Typed config of the service sections: ``evaluate``, ``registry``, ``schedule``, ``cluster``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from jobs.train.config import DEFAULT_PROMPTS
from pipeline.config_base import NAME_PATTERN, Section

# Never shipped to a cluster: local environments, outputs, tracking stores, caches.
DEFAULT_EXCLUDES = [
    ".venv", ".git", "outputs", "mlruns", "mlartifacts", "mlflow.db", "*.db",
    "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info",
]  # fmt: skip


class EvaluateConfig(Section):
    inputs: list[str] = Field(
        default_factory=list,
        description="Held-out text files/folders/globs (local or s3://), tokenized with the "
        "dataset's tokenizer; empty = only the dataset's val split.",
    )
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass.")
    max_batches: int = Field(16, gt=0, description="Batches per eval set (bounds the cost).")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = Field(32, ge=0)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy, so samples are repeatable.")


class RegistryConfig(Section):
    model_name: str = Field("moe-pretrain", description="Registered model name in MLflow.")
    gate: Literal["loss", "always", "never"] = Field(
        "loss", description="loss = champion moves only if the new eval loss beats it."
    )
    gate_metric: Literal["auto", "val/loss", "heldout/loss"] = Field(
        "auto", description="auto = heldout/loss when evaluate.inputs is set, else val/loss."
    )
    gate_min_delta: float = Field(
        0.0, ge=0.0, description="The new loss must be lower than the champion's by more than this."
    )

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_PATTERN.match(v):
            raise ValueError(f"must be letters, digits, '.', '_' or '-', got {v!r}")
        return v


class ScheduleConfig(Section):
    store: str = Field(
        "schedules.db", description="SQLite file holding the schedules and their run history."
    )
    poll_seconds: float = Field(
        5.0, gt=0, description="How often the daemon rereads the store and job states."
    )


class ClusterConfig(Section):
    address: str | None = Field(
        None, description="Ray dashboard URL, http://HEAD:8265; default $RAY_ADDRESS if http(s)."
    )
    working_dir: str = Field(".", description="Folder shipped to the cluster with the job.")
    excludes: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    pip: list[str] = Field(
        default_factory=list, description="Extra pip requirements installed for the job."
    )
    install_project_deps: bool = Field(
        False, description="Also pip-install this package's own dependencies (image lacks them)."
    )
    env_vars: dict[str, str] = Field(default_factory=dict)
    entrypoint_num_cpus: float = Field(
        0.0, ge=0, description="CPUs reserved for the driver; training reserves its own."
    )
