"""Where a model came from: hashes and URIs tagged on the pipeline run and the model version.

A submitted job runs from a copy of the working directory without ``.git``,
so ``submit`` passes the commit along in ``MOE_PRETRAIN_GIT_COMMIT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

GIT_ENV = "MOE_PRETRAIN_GIT_COMMIT"
UNKNOWN = "unknown"


def stable_hash(payload: Any, length: int = 16) -> str:
    """sha256 of canonical JSON: the same payload gives the same hash on every machine."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_config_hash(cfg) -> str:
    """Hash of the whole resolved config tree (secrets dump as stars, so they never count)."""
    return stable_hash(cfg.model_dump(mode="json"))


def git_commit(cwd: str | Path | None = None) -> str:
    """``<sha>`` or ``<sha>-dirty`` of ``cwd``'s checkout, else of this package's; or ``unknown``."""
    if os.environ.get(GIT_ENV):
        return os.environ[GIT_ENV]
    for where in (cwd or Path.cwd(), Path(__file__).resolve().parents[2]):
        try:
            sha = _git(str(where), "rev-parse", "HEAD")
            dirty = _git(str(where), "status", "--porcelain", "--untracked-files=no")
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
            continue
        return f"{sha}-dirty" if dirty else sha
    return UNKNOWN


def _git(cwd: str, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def dataset_lineage(manifest: dict[str, Any], dataset_uri: str) -> dict[str, str]:
    return {
        "lineage.dataset_name": manifest.get("name", ""),
        "lineage.dataset_fingerprint": manifest.get("fingerprint", ""),
        "lineage.manifest_uri": f"{dataset_uri.rstrip('/')}/manifest.json",
        "lineage.tokenizer_sha256": manifest.get("tokenizer", {}).get("sha256", ""),
    }
