"""What every section of the config tree shares: its pydantic base and the rule for names.

Lives in ``pipeline`` (the lowest layer with a section: ``data``); ``jobs`` builds
its sections on the same base.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

# Dataset and registered-model names: a folder under the storage root, an MLflow model name.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Section(BaseModel):
    """A typo in a key, or a bad value assigned later, is an error instead of being ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
