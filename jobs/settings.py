"""Load the config tree from ``--config FILE.yaml`` plus ``--set key.path=value`` overrides.

Every subcommand calls ``load_root_config`` (the tree itself, ``RootConfig``, is in
``jobs/config.py``), so a config that runs on a laptop runs unchanged on a cluster.
Errors are one line naming the bad key, because a user reading a stack trace for a
typo is a user we lost.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.redaction import is_secret_key, redact, redact_uri

if TYPE_CHECKING:
    from jobs.config import RootConfig

M = TypeVar("M", bound=BaseModel)
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A user's config is wrong: the message names the key and the problem."""


def _shown(item: str) -> str:
    """A malformed ``--set`` item as its error echoes it: never what could be a credential."""
    if "=" in item:  # no key: all of it is the value
        return "=..."
    if any(is_secret_key(part) for part in item.split(".")):
        return "(not shown: it may hold a credential)"
    return redact_uri(item)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {_shown(item)!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        value = float(value)  # YAML 1.1 reads "3e-4" as a string; users mean a number
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                key = ".".join(path)  # not the value: it may be a credential
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top level")
    return data


def format_validation_error(err: ValidationError) -> str:
    """One line: the first failing key, what was wrong, and the value given."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"unknown config key {key!r}"
    msg = first["msg"]
    if first["type"] == "value_error":
        inner = str(first.get("ctx", {}).get("error", msg.removeprefix("Value error, ")))
        return inner if "config key" in inner else f"config key {key!r}: {inner}"
    if "input" in first and first["type"] != "missing":
        if any(is_secret_key(str(part)) for part in first["loc"]):
            return f"config key {key!r}: {msg} (the value is not shown: the key holds a credential)"
        return f"config key {key!r}: {msg} (got {redact(first['input'])!r})"
    return f"config key {key!r}: {msg}"


def build(model_cls: type[M], data: dict[str, Any]) -> M:
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def raw_tree(
    config: str | Path | None, sets: list[str] | None, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The tree before validation (what ``submit`` and ``schedule add`` ship): ``--config``'s
    YAML, or ``base`` in its place, then the ``--set`` items."""
    tree = copy.deepcopy(base) if base is not None else read_yaml(config) if config else {}
    return apply_overrides(tree, list(sets or []))


def load_root_config(
    config: str | Path | None, sets: list[str] | None, base: Mapping[str, Any] | None = None
) -> RootConfig:
    """The validated ``RootConfig`` from ``--config`` and ``--set``: what every subcommand reads.

    ``base`` replaces the YAML file: the demo's defaults, a submitted job's ``--config-json``.
    """
    from jobs.config import RootConfig  # jobs.config's sections import ConfigError from here

    return build(RootConfig, raw_tree(config, sets, base))


def tree_from_json(text: str | None) -> dict[str, Any] | None:
    """``--config-json`` (the inline tree a submitted job gets) as a mapping; None if not given."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config-json: not valid JSON ({e.msg})") from None


def load_config(
    model_cls: type[M], path: str | Path | None = None, overrides: list[str] | None = None
) -> M:
    """Any config model from a YAML file plus ``--set`` items; subcommands use ``load_root_config``."""
    return build(model_cls, raw_tree(path, overrides))
