"""Read a committed dataset: the manifest, verified shards, the tokenizer (numpy + pyarrow).

Only what the manifest lists is read, and every shard's sha256 is checked
before its rows are handed out, so a corrupt or half-copied shard fails loudly
with its name instead of training on garbage. A shard path is relative to the
dataset folder; an incremental dataset names its base's shards as
``../{base}/train/part-00000.parquet``. A mixture's shards carry their
``source`` (``train/{source}/part-00000.parquet``), and ``mixture`` lists the
sources with their weights.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import S3Options
from pipeline.errors import ChecksumError, PipelineError
from pipeline.manifest import read_manifest
from pipeline.storage import read_bytes, resolve


class DatasetReader:
    def __init__(self, uri: str, s3: S3Options | None = None):
        self.uri = uri.rstrip("/")
        self.s3 = s3
        self.manifest: dict[str, Any] = read_manifest(self.uri, s3)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def row_len(self) -> int:
        return int(self.manifest["row_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def eos_token_id(self) -> int:
        return int(self.manifest["special_tokens"]["eos"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise PipelineError(f"split {split!r} not in dataset {self.uri} (has {self.splits})")
        return self.manifest["splits"][split]

    @property
    def mixture(self) -> list[dict[str, Any]] | None:
        """The sources of a mixture (name, weight, max_epochs, counts); None for one source."""
        return self.manifest.get("mixture")

    def source_shards(self, split: str) -> dict[str, list[int]]:
        """Shard indices of each source of a mixture, in manifest order."""
        out: dict[str, list[int]] = {m["name"]: [] for m in self.mixture or []}
        for i, shard in enumerate(self.shards(split)):
            out[shard["source"]].append(i)
        return out

    def num_rows(self, split: str) -> int:
        return int(self._split(split)["rows"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        return list(self._split(split)["shards"])

    def shard_row_offsets(self, split: str) -> np.ndarray:
        """``[num_shards + 1]`` cumulative rows: shard ``i`` holds global rows
        ``offsets[i]:offsets[i+1]`` (for samplers that index rows globally)."""
        rows = [int(s["rows"]) for s in self.shards(split)]
        return np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64)

    def read_shard(self, split: str, i: int) -> np.ndarray:
        """Rows ``[rows, seq_len + 1]`` of shard ``i``; ``ChecksumError`` if its bytes changed."""
        shards = self.shards(split)
        if not 0 <= i < len(shards):
            raise PipelineError(f"shard {i} out of range: split {split!r} has {len(shards)}")
        meta = shards[i]
        uri = resolve(self.uri, meta["path"])
        try:
            data = read_bytes(uri, self.s3)
        except FileNotFoundError:
            raise ChecksumError(f"shard {meta['path']} of {self.uri} is missing") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta["sha256"]:
            raise ChecksumError(
                f"shard {meta['path']} of {self.uri}: sha256 {digest[:12]}... "
                f"does not match the manifest's {meta['sha256'][:12]}..."
            )
        column = pq.read_table(pa.BufferReader(data)).column("input_ids").combine_chunks()
        rows = column.flatten().to_numpy().reshape(-1, self.row_len).astype(self.dtype)
        if len(rows) != meta["rows"]:
            raise ChecksumError(
                f"shard {meta['path']}: {len(rows)} rows, manifest says {meta['rows']}"
            )
        return rows

    def load_tokenizer(self):
        from tokenizers import Tokenizer

        info = self.manifest["tokenizer"]
        data = read_bytes(resolve(self.uri, info["file"]), self.s3)
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise ChecksumError(f"{info['file']} of {self.uri}: sha256 does not match the manifest")
        return Tokenizer.from_str(data.decode("utf-8"))
