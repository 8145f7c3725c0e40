"""The driver's single ordered pass: quarantine, dedup, split, pack, write.

Everything order-dependent happens here, on the stream that the parallel
stages deliver in input order, which is what makes the output identical at
any parallelism. It holds one packer carry and one pending shard per split,
so memory does not grow with the corpus (besides the document hashes: the
dedup set and the kept documents' hashes, 8 bytes each, stored for later
incremental builds).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import PrepareConfig
from pipeline.dedup import Deduper
from pipeline.manifest import SPLITS
from pipeline.near_dedup import Match, NearDeduper
from pipeline.pack import Packer
from pipeline.quarantine import QuarantineWriter
from pipeline.writer import ShardWriter

_QUARANTINE_COLUMNS = ["reason", "source", "line", "offset", "detail", "text"]
# Fewer packed train rows than this and no val split is made from them.
MIN_ROWS_FOR_TAIL_VAL = 2


def val_threshold(val_fraction: float) -> np.uint64:
    """Documents whose unsigned hash falls below this go to val."""
    return np.uint64(min(int(val_fraction * 2**64), 2**64 - 1))


class Assembler:
    def __init__(
        self,
        cfg: PrepareConfig,
        dataset_uri: str,
        dtype: np.dtype,
        seen: np.ndarray | None = None,
        quarantine: QuarantineWriter | None = None,
        source: str | None = None,
    ):
        """``seen``: hashes of documents kept by the dataset this build extends;
        ``quarantine``: shared by the sources of a mixture (the caller closes it);
        ``source``: the mixture source, whose shards go to ``{split}/{source}/``."""
        self.cfg = cfg
        self.dedup = Deduper(cfg.dedup)
        self.near = NearDeduper(cfg.near_dup) if cfg.near_dup.enabled else None
        if seen is not None:
            self.dedup.seed(seen)
        self.quarantine = quarantine or QuarantineWriter(dataset_uri, cfg.s3)
        self.packers = {s: Packer(cfg.row_len, dtype) for s in SPLITS}
        # Train holds one shard back, so that the tail can still become val (``_tail_val``).
        self.writers = {
            s: ShardWriter(dataset_uri, f"{s}/{source}" if source else s, cfg.row_len, dtype,
                           cfg.shard_rows, cfg.s3, hold_back=cfg.shard_rows if s == "train" else 0)
            for s in SPLITS
        }  # fmt: skip
        self.documents = dict.fromkeys(SPLITS, 0)
        self.records_in = 0
        self.kept_hashes: list[np.ndarray] = []
        self.done = False
        self._val = val_threshold(cfg.val_fraction)

    @property
    def kept(self) -> int:
        return sum(self.documents.values())

    def consume(self, table: pa.Table) -> None:
        if self.done or table.num_rows == 0:
            return
        ok = pc.is_null(table.column("reason")).to_numpy(zero_copy_only=False)
        good_rows = np.flatnonzero(ok)
        hashes = table.column("hash").to_numpy()[good_rows]
        budget = None if self.cfg.max_documents is None else self.cfg.max_documents - self.kept
        matches: dict[int, Match] = {}
        near = self._near_check(table, good_rows, hashes, matches) if self.near else None
        keep, consumed = self.dedup.select(hashes, budget, near)
        if consumed < len(hashes) or (budget is not None and keep.sum() == budget):
            self.done = True
            end = int(good_rows[consumed - 1]) + 1
            table, ok = table.slice(0, end), ok[:end]
            good_rows, hashes, keep = good_rows[:consumed], hashes[:consumed], keep[:consumed]
        self.records_in += table.num_rows
        self._quarantine(table.filter(pa.array(~ok)))
        self._quarantine_near(table, good_rows, matches)
        ids = table.column("ids").take(pa.array(good_rows))
        self.kept_hashes.append(hashes[keep])
        is_val = hashes.view(np.uint64) < self._val
        for split, mask in (("train", keep & ~is_val), ("val", keep & is_val)):
            self._pack(split, ids.filter(pa.array(mask)))
            self.documents[split] += int(mask.sum())

    def _quarantine(self, rejected: pa.Table) -> None:
        for record in rejected.select(_QUARANTINE_COLUMNS).to_pylist():
            self.quarantine.add(record)

    def _near_check(self, table, good_rows, hashes, matches: dict[int, Match]):
        """``Deduper.select``'s question for row ``i`` of the good rows; a near duplicate's
        match is kept in ``matches``."""
        signatures = table.column("minhash").combine_chunks().flatten().to_numpy()
        signatures = signatures.reshape(table.num_rows, -1)
        sources, lines = table.column("source"), table.column("line")

        def is_near_duplicate(i: int) -> bool:
            row = int(good_rows[i])
            found = self.near.check(
                signatures[row], int(hashes[i]), sources[row].as_py(), lines[row].as_py()
            )
            if found is not None:
                matches[i] = found
            return found is not None

        return is_near_duplicate

    def _quarantine_near(self, table, good_rows, matches: dict[int, Match]) -> None:
        """Near duplicates are kept, with the document they matched, not only counted:
        unlike an exact copy, they differ from what was kept."""
        for i, m in sorted(matches.items()):
            row = int(good_rows[i])
            record = table.slice(row, 1).select(["source", "line", "offset"]).to_pylist()[0]
            self.quarantine.add(
                {
                    "reason": "near_duplicate",
                    **record,
                    "detail": f"~{m.similarity:.2f} Jaccard with {m.source} line {m.line}",
                    "text": None,
                    "matched_hash": m.hash,
                    "matched_source": m.source,
                    "matched_line": m.line,
                    "similarity": m.similarity,
                }
            )

    def _pack(self, split: str, ids: pa.ChunkedArray) -> None:
        flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
        if len(flat):
            self.writers[split].add(self.packers[split].add(flat))

    def _tail_val(self) -> dict[str, Any]:
        """How val was made; when no document hashed into it (a corpus of one book, or a
        handful of documents), the last ``ceil(val_fraction * train rows)`` packed train
        rows become val instead (at least 1, at most the rows held back, one shard or
        more; train keeps at least 1)."""
        train_rows = self.writers["train"].rows
        if self.documents["val"] or not self.cfg.val_fraction or train_rows < MIN_ROWS_FOR_TAIL_VAL:
            return {"method": "document_hash", "rows_from_train": 0}
        want = min(max(1, math.ceil(self.cfg.val_fraction * train_rows)), train_rows - 1)
        rows = self.writers["train"].take_last(want)
        self.writers["val"].add(rows)
        return {"method": "train_tail", "rows_from_train": len(rows)}

    def _near_summary(self) -> dict[str, Any] | None:
        if self.near is None:
            return None
        bands, rows = self.near.bands
        return {
            **self.cfg.near_dup.model_dump(),
            "bands": bands,
            "rows_per_band": rows,
            "removed": self.near.removed,
        }

    def finish(self) -> dict[str, Any]:
        val_split = self._tail_val()
        splits = {}
        for split in SPLITS:
            shards = self.writers[split].close()
            splits[split] = {
                "documents": self.documents[split],
                "tokens": sum(s["tokens"] for s in shards),
                "rows": sum(s["rows"] for s in shards),
                "remainder_tokens": self.packers[split].remainder,
                "shards": shards,
            }
        return {
            "splits": splits,
            "duplicates_removed": self.dedup.removed,
            "near_duplicates": self._near_summary(),
            "records_in": self.records_in,
            "val_split": val_split,
        }
