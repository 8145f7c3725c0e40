"""The training data order: a pure function of (seed, epoch, global sample index).

Global sample ``g`` lives in epoch ``g // N`` (N = rows in the split) at
position ``g % N`` of that epoch's seeded permutation. An optimizer step takes
the next ``global_batch`` samples; rank ``r`` at micro step ``m`` reads chunk
``m * world + r`` of them. The chunks of a step are the same for any world
size at a fixed global batch, so 1 worker and 8 workers see the same data, and
resuming needs nothing but the number of samples already consumed.

Ray Data's iterator cannot resume mid-epoch; this can, because nothing in it
depends on history.

The permutation is shuffled in windows of shards (shard order permuted, then
rows permuted within each window of ``window`` shards): a uniform shuffle of a
dataset much larger than memory would read a different shard for every row.
With ``window >= num_shards`` it is a uniform permutation of all rows.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class Sampler:
    def __init__(self, shard_rows: list[int], seed: int, window: int = 8) -> None:
        if not shard_rows or sum(shard_rows) == 0:
            raise ValueError("shard_rows: the split has no rows to sample from")
        self.shard_rows = list(shard_rows)
        self.seed = seed
        self.window = window
        self.num_rows = int(sum(shard_rows))
        self._starts = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        self._perm = lru_cache(maxsize=2)(self._epoch_permutation)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.shard_rows))
        parts = []
        for w in range(0, len(order), self.window):
            shards = order[w : w + self.window]
            rows = np.concatenate([np.arange(self._starts[s], self._starts[s + 1]) for s in shards])
            parts.append(rng.permutation(rows))
        return np.concatenate(parts)

    def rows(self, start: int, count: int) -> np.ndarray:
        """Row ids (into the concatenated shards) of global samples ``start .. start+count``."""
        out = np.empty(count, dtype=np.int64)
        g, filled = start, 0
        while filled < count:
            epoch, pos = divmod(g, self.num_rows)
            take = min(count - filled, self.num_rows - pos)
            out[filled : filled + take] = self._perm(epoch)[pos : pos + take]
            filled += take
            g += take
        return out

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row within shard) of each row id."""
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        return shard, rows - self._starts[shard]


def micro_batch_samples(
    step_start: int, rank: int, world: int, micro: int, micro_batch: int
) -> tuple[int, int]:
    """(first global sample, count) that ``rank`` reads at micro step ``micro`` of a step."""
    chunk = micro * world + rank
    return step_start + chunk * micro_batch, micro_batch
