"""Exact dedup across the whole corpus by content hash, first occurrence wins.

It runs in the driver on the ordered stream, so "first" is the stable
document order and the result does not depend on parallelism. Memory is one
64-bit hash per distinct document (about 70 bytes each in a Python set: 70 MB
for a million documents), independent of document length.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class Deduper:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seen: set[int] = set()
        self.removed = 0

    def seed(self, hashes: np.ndarray) -> None:
        """Documents kept earlier (an incremental build's base): their copies are duplicates."""
        self.seen.update(hashes.tolist())

    def select(
        self,
        hashes: np.ndarray,
        budget: int | None = None,
        is_near_duplicate: Callable[[int], bool] | None = None,
    ) -> tuple[np.ndarray, int]:
        """``(keep mask, rows consumed)``; stops after ``budget`` kept documents.

        ``is_near_duplicate(i)`` is asked about each row that is no exact duplicate, in
        order, so that a budget counts only the documents that are really kept."""
        keep = np.zeros(len(hashes), bool)
        kept = 0
        for i, h in enumerate(hashes.tolist()):
            if self.enabled and h in self.seen:
                self.removed += 1
                continue
            if is_near_duplicate is not None and is_near_duplicate(i):
                continue
            if self.enabled:
                self.seen.add(h)
            keep[i] = True
            kept += 1
            if budget is not None and kept >= budget:
                return keep, i + 1
        return keep, len(hashes)
