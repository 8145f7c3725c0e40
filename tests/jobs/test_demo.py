"""The demo's embedded defaults and ``configs/demo.yaml`` are the same tree, and it is valid."""

from __future__ import annotations

from pathlib import Path

from jobs.config import RootConfig
from jobs.service.demo import demo_tree
from jobs.settings import build, load_config

REPO = Path(__file__).resolve().parents[2]


def test_demo_yaml_matches_embedded_defaults():
    from_yaml = load_config(RootConfig, REPO / "configs" / "demo.yaml")
    assert from_yaml == build(RootConfig, demo_tree())
    assert from_yaml.tracking.uri == "sqlite:///mlflow.db"
    assert from_yaml.data.inputs == ["builtin://python-docs"]
    assert from_yaml.model.preset == "tiny"
    assert not Path(from_yaml.storage.root).is_absolute()  # lands in the working directory
