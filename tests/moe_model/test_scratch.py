"""The CPU scratch pool: a buffer comes back only when no live tensor shares its storage."""

import pytest
import torch

from moe_model.cpu import hugepages, scratch


@pytest.fixture(autouse=True)
def small_pool(monkeypatch):
    """Pool (and huge-page) every size inside a fresh scope, as the trainer opens one."""
    monkeypatch.setattr(scratch, "MIN_BYTES", 1)
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1)
    with scratch.scope() as pool:
        yield pool


def test_a_released_buffer_is_reused(small_pool):
    like = torch.empty(0)
    a = scratch.empty((4, 8), like)
    ptr = a.data_ptr()
    del a
    b = scratch.empty((8, 4), like)
    assert b.data_ptr() == ptr and b.shape == (8, 4)
    assert (small_pool.hits, small_pool.misses) == (1, 1)


def test_the_innermost_scope_serves_and_frees_its_pool_at_exit(small_pool):
    like = torch.empty(0)
    scratch.empty((4, 8), like)
    with scratch.scope() as inner:  # the innermost scope serves, and frees its pool at exit
        scratch.empty((4, 8), like)
        assert inner.misses == 1 and scratch.pooled_bytes() == 32 * 4
    assert inner.pooled_bytes == 0 and small_pool.misses == 1


def test_no_scope_means_plain_allocation(small_pool, monkeypatch):
    monkeypatch.setattr(scratch, "_active", [])  # as if no scope were open
    a = scratch.empty((4, 8), torch.empty(0))
    del a
    scratch.empty((4, 8), torch.empty(0))
    assert (small_pool.hits, small_pool.misses, small_pool.pooled_bytes) == (0, 0, 0)
    monkeypatch.undo()  # the fixture's scope closes on the real stack


def test_threads_never_share_a_buffer(small_pool):
    """Two threads allocating at once each get their own buffer (the pool is locked)."""
    import threading

    like = torch.empty(0)
    held: list[torch.Tensor] = []
    guard = threading.Lock()

    def grab():
        for _ in range(200):
            t = scratch.empty((4, 8), like)
            with guard:
                held.append(t)

    threads = [threading.Thread(target=grab) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({t.data_ptr() for t in held}) == len(held)


def test_a_buffer_in_use_is_never_handed_out_again():
    like = torch.empty(0)
    a = scratch.empty((4, 8), like)
    a.fill_(1.0)
    b = scratch.empty((4, 8), like)
    assert b.data_ptr() != a.data_ptr()
    b.fill_(2.0)
    assert torch.all(a == 1.0)


def test_a_view_or_saved_tensor_keeps_the_buffer_busy():
    like = torch.empty(0)
    a = scratch.empty((4, 8), like)
    row = a[1]
    ptr = a.data_ptr()
    del a
    assert scratch.empty((4, 8), like).data_ptr() != ptr
    del row
    assert scratch.empty((4, 8), like).data_ptr() == ptr


def test_dtype_and_size_are_part_of_the_key():
    like = torch.empty(0)
    a = scratch.empty((4, 8), like)
    ptr = a.data_ptr()
    del a
    other_dtype = scratch.empty((4, 8), like, dtype=torch.float64)
    other_size = scratch.empty((4, 9), like)
    assert ptr not in (other_dtype.data_ptr(), other_size.data_ptr())
    assert other_dtype.dtype == torch.float64


def test_pool_is_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(scratch, "MAX_POOL_BYTES", 3 * 32 * 4)
    like = torch.empty(0)
    for cols in (8, 9, 10, 11):  # four distinct keys of 32..44 floats
        scratch.empty((4, cols), like)
    assert scratch.pooled_bytes() <= 3 * 32 * 4
    a = scratch.empty((4, 11), like)  # the most recent key survived
    ptr = a.data_ptr()
    del a
    assert scratch.empty((4, 11), like).data_ptr() == ptr


def test_small_buffers_are_not_pooled(monkeypatch):
    monkeypatch.setattr(scratch, "MIN_BYTES", 1024)
    scratch.empty((4, 8), torch.empty(0))
    assert scratch.pooled_bytes() == 0


def test_a_buffer_larger_than_the_pool_evicts_nothing(monkeypatch):
    monkeypatch.setattr(scratch, "MAX_POOL_BYTES", 2 * 32 * 4)
    like = torch.empty(0)
    a = scratch.empty((4, 8), like)
    ptr = a.data_ptr()
    del a
    huge = scratch.empty((4, 100), like)  # over the cap: handed out, never pooled
    assert scratch.pooled_bytes() == 32 * 4
    del huge
    assert scratch.empty((4, 8), like).data_ptr() == ptr
