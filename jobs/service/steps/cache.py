"""Step cache: a committed record per (step, fingerprint) under the storage root.

``{root}/pipeline/{step}/{fingerprint}.json`` is written only after the
step's output is complete, so its presence means "this work is done". The
fingerprint hashes everything the output depends on: the upstream output's
identity (dataset fingerprint, checkpoint URI) and the step's own config.
A record is a hit only if the caller's check says its outputs still exist.
The record names its step under the key ``"stage"``, the name it was stored
under before the DAG's steps were called steps; records on disk keep reading.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

from pipeline.config import S3Options
from pipeline.storage import commit_file, filesystem, join

STEPS = ("prepare", "train", "evaluate", "register")


class StepCache:
    def __init__(self, root: str, s3: S3Options | None = None):
        self.root = join(root, "pipeline")
        self.s3 = s3

    def uri(self, step: str, fingerprint: str) -> str:
        return join(self.root, step, f"{fingerprint}.json")

    def lookup(
        self, step: str, fingerprint: str, valid: Callable[[dict[str, Any]], bool] = lambda r: True
    ) -> dict[str, Any] | None:
        fs, path = filesystem(self.uri(step, fingerprint), self.s3)
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            record = json.load(f)
        return record if valid(record) else None

    def commit(self, step: str, fingerprint: str, record: dict[str, Any]) -> str:
        uri = self.uri(step, fingerprint)
        fd, tmp = tempfile.mkstemp(suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"stage": step, "fingerprint": fingerprint, **record}, f, indent=2)
            commit_file(tmp, uri, self.s3)
        finally:
            os.remove(tmp)
        return uri

    def exists(self, uri: str) -> bool:
        fs, path = filesystem(uri, self.s3)
        return fs.exists(path)
