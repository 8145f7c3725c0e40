"""Rejected records: reason codes, and the JSONL files they are kept in.

Every record the pipeline does not use (other than exact duplicates, which
are only counted; near duplicates are kept here with the document they matched) lands here with where it came from, so nothing is lost
silently and a user can fix the source and rerun.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from typing import Any

from pipeline.config import S3Options
from pipeline.storage import commit_file, join

REASONS = {
    "invalid_utf8": "bytes that do not decode as UTF-8 (offset = first bad byte)",
    "invalid_json": "a JSON line or array element that does not parse, or nests over 128 deep",
    "missing_field": "the text field/column is absent or null",
    "non_string_field": "the text field/column holds a non-string value",
    "empty": "nothing left after cleaning",
    "near_duplicate": "estimated Jaccard >= data.near_dup.threshold with an earlier kept "
    "document (matched_hash/source/line name it)",
    "too_short": "fewer characters than data.clean.min_chars",
    "too_long": "more characters than data.clean.max_chars (or an over-long line)",
    "repetitive": "too many characters in duplicated lines (data.clean.max_repeated_line_fraction)",
    "low_alpha": "too few letters among non-space characters (data.clean.min_alpha_fraction)",
    "binary_file": "a NUL byte in the first 8 KiB of a text/JSON file",
    "too_large": "a file past data.max_file_bytes decompressed (records before that are kept)",
    "corrupt_compression": "a gzip/zstd stream that is truncated or corrupt (records before it are kept)",
    "unreadable_file": "the file cannot be opened or read (permissions, I/O error, bad Parquet)",
    "unparseable_source": "a built-in corpus source file that Python cannot parse",
    "unsupported_format": "a file in an input folder whose suffix is not a known format",
}
SNIPPET_CHARS = 200


def snippet(text: str | None) -> str | None:
    return None if text is None else text[:SNIPPET_CHARS]


class QuarantineWriter:
    """Append rejected records to ``quarantine/part-NNNNN.jsonl`` files, committed as they fill."""

    def __init__(self, dataset_uri: str, s3: S3Options | None, records_per_file: int = 100_000):
        self.dataset_uri = dataset_uri
        self.s3 = s3
        self.records_per_file = records_per_file
        self.by_reason: Counter[str] = Counter()
        self.files: list[str] = []
        self._tmp: Any = None
        self._count = 0

    def add(self, record: dict[str, Any]) -> None:
        assert record["reason"] in REASONS, record["reason"]
        if self._tmp is None:
            self._tmp = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)  # noqa: SIM115
        self._tmp.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.by_reason[record["reason"]] += 1
        self._count += 1
        if self._count >= self.records_per_file:
            self._flush()

    def _flush(self) -> None:
        if self._tmp is None:
            return
        self._tmp.close()
        rel = f"quarantine/part-{len(self.files):05d}.jsonl"
        try:
            commit_file(self._tmp.name, join(self.dataset_uri, rel), self.s3)
        finally:
            os.remove(self._tmp.name)
        self.files.append(rel)
        self._tmp, self._count = None, 0

    def close(self) -> dict[str, Any]:
        self._flush()
        return {
            "total": sum(self.by_reason.values()),
            "by_reason": dict(sorted(self.by_reason.items())),
            "files": list(self.files),
        }
