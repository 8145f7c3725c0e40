"""``RootConfig``: the one config tree every subcommand reads, assembled here.

Load it with ``jobs.settings.load_root_config(--config, --set)``. Each section is
owned by the part that uses it; this is where to find them all:

    storage, tracking, model   here (``model`` is a ``moe_model`` preset plus field overrides)
    data                       pipeline/config.py        PrepareConfig
    train                      jobs/train/config.py      TrainConfig
    evaluate, registry,        jobs/service/config.py    EvaluateConfig, RegistryConfig,
    schedule, cluster                                    ScheduleConfig, ClusterConfig

Every section but ``model`` is a ``pipeline.config_base.Section``. ``storage.root`` is
where datasets, checkpoints and models land: a local folder on a laptop,
``s3://bucket/prefix`` on a cluster.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.service.config import ClusterConfig, EvaluateConfig, RegistryConfig, ScheduleConfig
from jobs.train.config import TrainConfig
from pipeline.config import PrepareConfig
from pipeline.config_base import Section


class StorageConfig(Section):
    root: str = Field("outputs", description="Local folder or s3://bucket/prefix for all outputs.")


class TrackingConfig(Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db",
    )
    experiment: str = "moe-pretrain"


# Embedding and LM-head GEMMs run fastest when V is a multiple of 64 (tensor-core tiles;
# nanoGPT pads GPT-2's 50257 to 50304 for the same reason).
VOCAB_MULTIPLE = 64


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class ModelSection(BaseModel):
    """``preset`` plus any ``moe_model.ModelConfig`` field to override it.

    ``vocab_size`` follows the dataset's tokenizer (padded to a multiple of 64)
    unless the user sets ``model.vocab_size``: a preset's vocabulary is a guess,
    the dataset's is a fact.
    """

    model_config = ConfigDict(extra="allow")
    preset: str = "tiny"

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        self.build()
        return self

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def build(self, data_vocab_size: int | None = None):
        """The model's config; ``data_vocab_size`` (the dataset's) sets V unless the user did."""
        from moe_model import ModelConfig
        from moe_model.config import ModelConfigError

        overrides = self.overrides()
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        for key in overrides:
            if key not in fields:
                raise ValueError(f"unknown config key 'model.{key}'")
        if data_vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = padded_vocab(data_vocab_size)
        try:
            return ModelConfig.preset(self.preset, **overrides)
        except ModelConfigError as e:
            raise ValueError(f"config key 'model.{e.field}': {e.problem}") from None


class RootConfig(Section):
    """The whole tree, one key per section; ``jobs.settings.load_root_config`` builds it."""

    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    data: PrepareConfig = PrepareConfig()
    model: ModelSection = ModelSection()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _samples_fit_the_context(self) -> RootConfig:
        # A sample is at least one prompt token plus the new ones, within max_seq_len.
        limit = self.model.build().max_seq_len
        if self.train.sample_max_new_tokens >= limit:
            raise ValueError(
                f"config key 'train.sample_max_new_tokens': must be below model.max_seq_len "
                f"({limit}), got {self.train.sample_max_new_tokens}"
            )
        return self
