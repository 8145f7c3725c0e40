"""Write packed rows as Parquet shards, each committed atomically with its sha256.

Column ``input_ids``: ``fixed_size_list<uint16|uint32>[seq_len + 1]``. A shard
is written to a local temporary file, hashed, then published through
``storage.commit_file`` (rename on disk, upload + size check on S3); the
manifest, written after every shard, is what makes them visible to readers.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import S3Options
from pipeline.storage import commit_file, join


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def rows_table(rows: np.ndarray) -> pa.Table:
    values = pa.array(rows.reshape(-1))
    return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(values, rows.shape[1])})


class ShardWriter:
    def __init__(
        self,
        dataset_uri: str,
        split: str,
        row_len: int,
        dtype: np.dtype,
        shard_rows: int,
        s3: S3Options | None = None,
        hold_back: int = 0,
    ):
        """``hold_back``: rows kept unwritten besides a full shard, so ``take_last`` can
        still return them at the end. Shard boundaries do not change, only when they
        are written."""
        self.dataset_uri = dataset_uri
        self.split = split
        self.row_len = row_len
        self.dtype = np.dtype(dtype)
        self.shard_rows = shard_rows
        self.s3 = s3
        self.shards: list[dict[str, Any]] = []
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self.hold_back = hold_back

    def add(self, rows: np.ndarray) -> None:
        assert rows.ndim == 2 and rows.shape[1] == self.row_len, rows.shape
        if not len(rows):
            return
        self._pending.append(rows)
        self._pending_rows += len(rows)
        while self._pending_rows >= self.shard_rows + self.hold_back:
            block = np.concatenate(self._pending)
            self._write(block[: self.shard_rows])
            rest = block[self.shard_rows :]
            self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)

    @property
    def rows(self) -> int:
        """Rows added so far: written in shards, and held back."""
        return sum(s["rows"] for s in self.shards) + self._pending_rows

    def take_last(self, n: int) -> np.ndarray:
        """Remove and return the last ``n`` rows not yet written (fewer if fewer are held)."""
        if not self._pending_rows or n <= 0:
            return np.empty((0, self.row_len), self.dtype)
        block = np.concatenate(self._pending)
        n = min(n, len(block))
        rest = block[: len(block) - n]
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)
        return block[len(block) - n :]

    def close(self) -> list[dict[str, Any]]:
        if self._pending_rows:
            self._write(np.concatenate(self._pending))
            self._pending, self._pending_rows = [], 0
        return self.shards

    def _write(self, rows: np.ndarray) -> None:
        rel = f"{self.split}/part-{len(self.shards):05d}.parquet"
        fd, tmp = tempfile.mkstemp(suffix=".parquet")
        os.close(fd)
        try:
            pq.write_table(
                rows_table(rows.astype(self.dtype, copy=False)),
                tmp,
                compression="zstd",
                use_dictionary=False,
                write_statistics=False,
            )
            digest = _sha256_local(tmp)
            commit_file(tmp, join(self.dataset_uri, rel), self.s3)
        finally:
            os.remove(tmp)
        self.shards.append(
            {"path": rel, "rows": len(rows), "tokens": int(rows.size), "sha256": digest}
        )


def _sha256_local(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
