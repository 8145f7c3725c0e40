"""The training order of a mixture: a pure function of (seed, global sample index).

Samples come in blocks of ``BLOCK``; in each block every source gets a fixed
quota (its weight's share, apportioned by largest remainder), and a seeded
permutation of the block decides which position is whose. So the number of
samples a source has given before any global index is a closed formula, the
``k``-th sample of a source is that source's own ``Sampler`` at ``k`` (its own
epochs and permutations), and resuming needs nothing but the global index, as
for one source.

``max_epochs``: a source stops after ``max_epochs * rows`` samples; from the
sample where it runs out, a new phase starts in which the remaining sources
share the blocks by their weights (the weight renormalised away). The phases
are computed up front (at most one per source), and ``schedule`` states them,
so a run can log when each source runs out. Past the last phase there is no
data: ``rows`` says so.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from jobs.train.sampler import Sampler

BLOCK = 1024


@dataclass(frozen=True)
class Source:
    name: str
    weight: float
    max_epochs: float | None
    shards: list[int]  # indices into the split's shard list
    shard_rows: list[int]

    @property
    def rows(self) -> int:
        return int(sum(self.shard_rows))

    @property
    def cap(self) -> float:
        """Samples this source can give: ``max_epochs`` passes, or without end."""
        return math.inf if self.max_epochs is None else math.floor(self.max_epochs * self.rows)


@dataclass(frozen=True)
class Phase:
    start: int  # first global sample of the phase
    end: float  # first global sample after it (inf: the last phase, without end)
    quota: np.ndarray  # samples per block of each source (0 when inactive)
    before: np.ndarray  # samples each source gave before the phase


def quotas(weights: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Integers summing to ``block``, proportional to ``weights`` (largest remainder)."""
    share = block * weights / weights.sum()
    out = np.floor(share).astype(np.int64)
    short = block - int(out.sum())
    order = np.lexsort((np.arange(len(share)), -(share - out)))  # ties: the earlier source
    out[order[:short]] += 1
    return out


def source_seed(seed: int, name: str) -> int:
    """A source's own seed, from its name: adding a source leaves the others' order alone."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class MixtureSampler:
    def __init__(
        self, sources: list[Source], all_shard_rows: list[int], seed: int, window: int = 8
    ):
        if not any(s.rows for s in sources):
            raise ValueError("the mixture has no train rows to sample from")
        self.sources = sources
        self.seed = seed
        # Shards in use at once, for the loader's cache: one window per source.
        self.window = window * len(sources)
        self._subs = [
            Sampler(s.shard_rows, source_seed(seed, s.name), window) if s.rows else None
            for s in sources
        ]
        self._starts = np.concatenate([[0], np.cumsum(all_shard_rows)]).astype(np.int64)
        self._labels = lru_cache(maxsize=8)(self._block_labels)
        self.phases_quota: list[np.ndarray] = []
        self.phases = self._plan()

    def _block_labels(self, phase: int, block: int) -> np.ndarray:
        quota = self.phases_quota[phase]
        labels = np.repeat(np.arange(len(self.sources)), quota)
        return np.random.default_rng([self.seed, phase, block]).permutation(labels)

    def _plan(self) -> list[Phase]:
        caps = np.array([s.cap if s.rows else 0 for s in self.sources], dtype=np.float64)
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        before = np.zeros(len(self.sources), np.int64)
        phases: list[Phase] = []
        start = 0
        while True:
            active = before < caps
            if not active.any():
                return phases
            quota = np.zeros(len(self.sources), np.int64)
            quota[active] = quotas(weights[active])
            self.phases_quota.append(quota)
            end = min(
                (self._runs_out(len(phases), i, int(caps[i] - before[i]), quota[i]) for i in
                 np.flatnonzero(active & np.isfinite(caps) & (quota > 0))),
                default=math.inf,
            )  # fmt: skip
            phases.append(Phase(start, start + end, quota, before.copy()))
            if math.isinf(end):
                return phases
            before = before + self._given(len(phases) - 1, int(end))
            start += int(end)

    def _runs_out(self, phase: int, source: int, left: int, quota: int) -> int:
        """Samples into the phase after which ``source`` has given ``left`` more."""
        full, rest = divmod(left, quota)
        if rest == 0:
            full, rest = full - 1, quota
        positions = np.flatnonzero(self._block_labels(phase, full) == source)
        return full * BLOCK + int(positions[rest - 1]) + 1

    def _given(self, phase: int, t: int) -> np.ndarray:
        """Samples of each source in the first ``t`` samples of ``phase``."""
        full, pos = divmod(t, BLOCK)
        labels = self._block_labels(phase, full)[:pos]
        partial = np.bincount(labels, minlength=len(self.sources))
        return full * self.phases_quota[phase] + partial

    @property
    def capacity(self) -> float:
        """Samples the mixture can give before every source reaches ``max_epochs`` (or inf)."""
        return self.phases[-1].end

    @property
    def schedule(self) -> list[dict]:
        """Each phase: where it starts and each source's share of it."""
        return [
            {
                "start": p.start,
                "shares": {
                    s.name: int(q) / BLOCK for s, q in zip(self.sources, p.quota, strict=True)
                },
            }
            for p in self.phases
        ]

    def rows(self, start: int, count: int) -> np.ndarray:
        """Row ids (into the split's concatenated shards) of global samples ``start ..``."""
        out = np.empty(count, np.int64)
        g, filled = start, 0
        while filled < count:
            p = self._phase_of(g)
            phase = self.phases[p]
            t = g - phase.start
            block, pos = divmod(t, BLOCK)
            take = int(min(count - filled, BLOCK - pos, phase.end - g))
            out[filled : filled + take] = self._block_rows(p, block, pos, take)
            filled += take
            g += take
        return out

    def _phase_of(self, g: int) -> int:
        for i, phase in enumerate(self.phases):
            if g < phase.end:
                return i
        names = ", ".join(s.name for s in self.sources)
        raise ValueError(
            f"sample {g}: every source ({names}) has given its max_epochs; "
            "raise max_epochs or lower train.max_steps"
        )

    def _block_rows(self, p: int, block: int, pos: int, take: int) -> np.ndarray:
        phase = self.phases[p]
        labels = self._labels(p, block)
        out = np.empty(take, np.int64)
        for i in np.unique(labels[pos : pos + take]):
            mask = labels == i
            rank = np.cumsum(mask) - 1  # the k-th sample of source i in this block
            here = mask[pos : pos + take]
            first = int(phase.before[i] + block * phase.quota[i])
            local = first + rank[pos : pos + take][here]
            out[here] = self._global(i, local)
        return out

    def _global(self, i: int, local: np.ndarray) -> np.ndarray:
        """Global row ids of samples ``local`` (consecutive) of source ``i``."""
        sub = self._subs[i]
        shard, offset = sub.locate(sub.rows(int(local[0]), len(local)))
        return self._starts[np.asarray(self.sources[i].shards)[shard]] + offset

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row within shard) of each row id, as ``Sampler.locate``."""
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        return shard, rows - self._starts[shard]


def train_sampler(reader, seed: int, window: int) -> Sampler | MixtureSampler:
    """The train split's sampler: by weight over a mixture's sources, else over all rows."""
    shard_rows = [sh["rows"] for sh in reader.shards("train")]
    if reader.mixture is None:
        return Sampler(shard_rows, seed, window)
    by_source = reader.source_shards("train")
    sources = [
        Source(
            m["name"],
            float(m["weight"]),
            m["max_epochs"],
            by_source[m["name"]],
            [shard_rows[i] for i in by_source[m["name"]]],
        )
        for m in reader.mixture
    ]
    return MixtureSampler(sources, shard_rows, seed, window)
