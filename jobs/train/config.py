"""Typed config of training (section ``train`` of the config tree).

STUB written by the coordinator: the training work owns and extends it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_steps: int = Field(200, gt=0)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0
    num_workers: int = Field(1, ge=1)
