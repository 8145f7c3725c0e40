"""Near-duplicate removal in the driver: a MinHash LSH index of the kept documents.

Documents arrive in the stable input order with their signatures
(``pipeline.minhash_stage``); each is looked up among the documents kept so
far and, when one of them is estimated at least ``threshold`` similar, it is
a near duplicate of the earliest such one, else it is kept and indexed. So
"first occurrence in input order wins", as for exact dedup, and the result
does not depend on parallelism. LSH banding (Broder 1997; Leskovec et al.,
"Mining of Massive Datasets", ch. 3.4) only proposes candidates; the
signature comparison decides, so a candidate below the threshold is never
removed. Banding parameters come from datasketch's ``MinHashLSH``, which
picks the bands and rows that minimise false positives plus false negatives
at the threshold. Only kept documents are indexed: a chain A~B~C with C far
from A keeps A and C.

Memory is one signature (``4 * num_perm`` bytes) plus one LSH key per band for
each kept document, about 1 KB at 128 permutations: a million documents fit a
driver, a web crawl does not (issue 17 asks for the index split by band over
workers; not done here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import NearDupConfig
from pipeline.minhash_stage import SCHEME, SEED


@dataclass(frozen=True)
class Match:
    """The kept document a near duplicate matched: its content hash and where it came from."""

    hash: int
    source: str
    line: int | None
    similarity: float


class NearDeduper:
    def __init__(self, cfg: NearDupConfig):
        from datasketch import MinHashLSH

        self.threshold = cfg.threshold
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        self.signatures: list[np.ndarray] = []
        self.kept: list[tuple[int, str, int | None]] = []
        self.removed = 0

    @property
    def bands(self) -> tuple[int, int]:
        """``(bands, rows per band)`` chosen for the threshold."""
        return self.lsh.b, self.lsh.r

    def check(
        self, signature: np.ndarray, doc_hash: int, source: str, line: int | None
    ) -> Match | None:
        """The match of a near duplicate; else None, and the document is indexed as kept."""
        found = self.match(signature)
        if found is None:
            self.add(signature, doc_hash, source, line)
        return found

    def match(self, signature: np.ndarray) -> Match | None:
        """The earliest kept document at least ``threshold`` similar, else None."""
        best = None
        for key in self.lsh.query(self._lean(signature)):
            similarity = float(np.mean(self.signatures[key] == signature))
            if similarity >= self.threshold and (best is None or key < best[0]):
                best = (key, similarity)
        if best is None:
            return None
        self.removed += 1
        return Match(*self.kept[best[0]], similarity=round(best[1], 4))

    def add(self, signature: np.ndarray, doc_hash: int, source: str, line: int | None) -> None:
        key = len(self.kept)
        self.lsh.insert(key, self._lean(signature), check_duplication=False)
        self.signatures.append(signature)
        self.kept.append((doc_hash, source, line))

    @staticmethod
    def _lean(signature: np.ndarray):
        from datasketch import LeanMinHash

        return LeanMinHash(seed=SEED, hashvalues=signature, scheme=SCHEME)
