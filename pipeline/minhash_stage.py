"""MinHash signatures of cleaned documents, computed on the workers.

A signature summarises a document's set of word n-gram shingles so that the
fraction of equal positions in two signatures estimates the Jaccard
similarity of the two sets (Broder 1997, "On the resemblance and containment
of documents"). Word 5-grams follow Lee et al. 2022 ("Deduplicating Training
Data Makes Language Models Better"). The hashing is the costly part, and it
depends on one document only, so it runs here, in parallel; the order-
dependent decision (which copy is kept) is made in the driver
(``pipeline.near_dedup``). datasketch does the hashing; the scheme is pinned
so a library upgrade cannot silently change the signatures.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import NearDupConfig
from pipeline.stage import Stage

SCHEME = "affine32"
SEED = 1
_WORD = re.compile(r"\w+")


def shingles(text: str, n: int) -> set[bytes]:
    """Lower-cased word n-grams; a document shorter than ``n`` words is one shingle."""
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def signatures(texts: list[str], cfg: NearDupConfig) -> np.ndarray:
    """``(len(texts), num_perm)`` uint32 MinHash values."""
    from datasketch import MinHash

    out = np.empty((len(texts), cfg.num_perm), np.uint32)
    sets = (shingles(t, cfg.ngram) for t in texts)
    for i, m in enumerate(MinHash.generator(sets, num_perm=cfg.num_perm, seed=SEED, scheme=SCHEME)):
        out[i] = m.hashvalues
    return out


class MinHashStage(Stage):
    """Adds ``minhash`` (one fixed-size list per row; all zeros for quarantined rows)."""

    name = "minhash"
    input_columns = ("text", "reason")
    output_columns = ("minhash",)

    def __init__(self, cfg: NearDupConfig):
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = pc.is_null(batch.column("reason"))
        rows = np.zeros((batch.num_rows, self.cfg.num_perm), np.uint32)
        rows[ok.to_numpy(zero_copy_only=False)] = signatures(
            batch.column("text").filter(ok).to_pylist(), self.cfg
        )
        values = pa.array(rows.reshape(-1), pa.uint32())
        return batch.append_column(
            "minhash", pa.FixedSizeListArray.from_arrays(values, self.cfg.num_perm)
        )
