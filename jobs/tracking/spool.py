"""Tracking items MLflow has not taken yet, kept under the run's storage until it does.

A spool is a folder of segments (JSON lines, one item a line), on local disk or S3. Each write
is one new segment: S3 has no append, and a segment of its own lets exactly the delivered
items be deleted. A local segment is fsynced, then renamed into place; an S3 segment is one
PUT. Names start with the write time in nanoseconds, so a later process (the run's resume)
reads them back in the order they were logged.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from pipeline.storage import join, list_files, read_bytes, remove, write_bytes_atomic

SEGMENT = re.compile(r"\d{20}-[0-9a-f]{8}\.jsonl")
KINDS = ("metrics", "params", "tags")  # artifacts are local file copies: not spooled


class SpoolError(ValueError):
    """A segment that is not what this module writes (left in place, never delivered)."""


class Spool:
    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")

    def write(self, items: list[tuple]) -> str:
        """Store ``items`` durably as a new segment; returns its name."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        data = "".join(json.dumps(list(item)) + "\n" for item in items)
        write_bytes_atomic(join(self.uri, name), data.encode())
        return name

    def segments(self) -> list[str]:
        return sorted(name for name in list_files(self.uri) if SEGMENT.fullmatch(name))

    def read(self, name: str) -> list[tuple]:
        items = []
        for line in read_bytes(join(self.uri, name)).decode().splitlines():
            item = json.loads(line)
            if not _valid(item):
                raise SpoolError(f"spool segment {name}: not a tracking item: {line[:80]!r}")
            items.append(tuple(item))
        return items

    def delete(self, name: str) -> None:
        remove(join(self.uri, name))


def _valid(item) -> bool:
    """What ``MlflowTracker`` spools: ``[metrics, {name: number}, step, ms]``, ``[params|tags,
    {name: text}]``."""
    if not isinstance(item, list) or not item or item[0] not in KINDS:
        return False
    if item[0] == "metrics":
        return (
            len(item) == 4 and isinstance(item[1], dict)
            and all(isinstance(v, (int, float)) for v in item[1].values())
            and all(isinstance(n, int) for n in item[2:])
        )  # fmt: skip
    return (
        len(item) == 2
        and isinstance(item[1], dict)
        and all(isinstance(v, str) for v in item[1].values())
    )
