"""The mixture sampler: shares by weight, max_epochs, determinism and exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.train.mixture_sampler import BLOCK, MixtureSampler, Source, quotas

# Two sources over five shards: "web" shards 0-2 (300 rows), "code" shards 3-4 (50 rows).
SHARD_ROWS = [100, 100, 100, 30, 20]


def sampler(seed=0, code_epochs=None, web_epochs=None, code_weight=1.0) -> MixtureSampler:
    sources = [
        Source("web", 3.0, web_epochs, [0, 1, 2], SHARD_ROWS[:3]),
        Source("code", code_weight, code_epochs, [3, 4], SHARD_ROWS[3:]),
    ]
    return MixtureSampler(sources, SHARD_ROWS, seed)


def source_of(s: MixtureSampler, rows: np.ndarray) -> np.ndarray:
    shard, _ = s.locate(rows)
    return np.where(shard >= 3, "code", "web")


def test_quotas_sum_to_the_block_in_proportion():
    q = quotas(np.array([3.0, 1.0]))
    assert q.tolist() == [768, 256] and q.sum() == BLOCK
    assert quotas(np.array([1.0, 1.0, 1.0])).tolist() == [342, 341, 341]


def test_sources_are_drawn_in_proportion_to_weight():
    s = sampler()
    got = source_of(s, s.rows(0, 4 * BLOCK))
    assert (got == "code").sum() == 4 * 256
    # Within a block the order is mixed, not one source then the other.
    first = got[:BLOCK]
    assert 0.15 < (first[:200] == "code").mean() < 0.35


def test_each_row_of_a_source_is_drawn_once_per_epoch():
    s = sampler()
    rows = s.rows(0, 4 * BLOCK)
    code = rows[source_of(s, rows) == "code"][:100]  # two epochs of its 50 rows
    assert sorted(code[:50].tolist()) == list(range(300, 350))
    assert sorted(code[50:].tolist()) == list(range(300, 350))
    assert code[:50].tolist() != code[50:].tolist(), "each epoch has its own permutation"


def test_max_epochs_stops_a_source_and_renormalises_the_rest():
    s = sampler(code_epochs=2)
    rows = s.rows(0, 3 * BLOCK)
    got = source_of(s, rows)
    assert (got == "code").sum() == 100
    last_code = int(np.flatnonzero(got == "code")[-1])
    assert s.phases[1].start == last_code + 1
    assert (got[last_code + 1 :] == "web").all()
    assert [p["shares"] for p in s.schedule] == [
        {"web": 0.75, "code": 0.25},
        {"web": 1.0, "code": 0.0},
    ]


def test_every_source_exhausted_is_an_error_naming_max_epochs():
    s = sampler(code_epochs=1, web_epochs=1)
    assert s.capacity == 350 and sampler(code_epochs=1).capacity == float("inf")
    assert len(s.rows(0, 350)) == 350
    with pytest.raises(ValueError, match="max_epochs"):
        s.rows(349, 2)


def test_resume_anywhere_continues_the_same_sequence():
    whole = sampler(seed=5, code_epochs=3).rows(0, 3000)
    for cut in (1, 777, BLOCK, 1500, 2999):
        fresh = sampler(seed=5, code_epochs=3)
        resumed = np.concatenate([fresh.rows(0, cut), sampler(5, 3).rows(cut, 3000 - cut)])
        np.testing.assert_array_equal(resumed, whole)


def test_seed_changes_the_order_not_the_shares():
    a, b = sampler(seed=1).rows(0, BLOCK), sampler(seed=2).rows(0, BLOCK)
    assert a.tolist() != b.tolist()
    assert (source_of(sampler(1), a) == "code").sum() == (source_of(sampler(2), b) == "code").sum()


def test_a_run_longer_than_every_source_allows_fails_before_the_first_step():
    from jobs.errors import JobError
    from jobs.train.loop import _check_capacity

    _check_capacity(sampler(code_epochs=1), 10**9)  # web is unbounded
    with pytest.raises(JobError, match=r"^train.max_steps: the run needs 351 samples.* allow 350"):
        _check_capacity(sampler(code_epochs=1, web_epochs=1), 351)
