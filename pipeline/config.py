"""Typed config of the ``prepare`` stage (section ``data`` of the config tree).

STUB written by the coordinator: the data-preparation work owns and extends it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PrepareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = "python-docs"
    inputs: list[str] = Field(default_factory=lambda: ["builtin://python-docs"])
    seq_len: int = Field(256, gt=0)
    vocab_size: int = Field(8192, ge=256)
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)
