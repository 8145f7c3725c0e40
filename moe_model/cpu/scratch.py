"""Reused CPU buffers for a training step's largest activations.

glibc serves a large tensor from a fresh mmap or from heap memory it has just trimmed, so a
training step page-faults its biggest buffers in again every time: 15-35k minor faults per
`tiny` step on the benchmark machine, and the forward expert GEMM ran at ~128 GFLOP/s writing
into a fresh [P, 2F] buffer against ~175 into a warm one. This pool keeps those buffers (on
transparent huge pages, `hugepages.py`) and hands one out again only while nothing but the pool
references its storage, so reuse can never be observed: a tensor saved for backward, returned
to a caller or kept across steps keeps its buffer out of the pool until the last view is freed.
On other devices the framework's caching allocator already does this: `empty` is `torch.empty`.

The pool lives as long as a `scope()` (the trainer opens one per run; the benchmarks do too)
and is freed when it closes; outside a scope `empty` is `torch.empty`. One lock guards it, so
a second thread allocating (a prefetcher, an evaluator) cannot take a buffer another holds.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator

import torch

from moe_model.cpu import hugepages

MIN_BYTES = 1 * 2**20
# Pooled bytes kept at most; the least recently used buffers are dropped beyond it.
MAX_POOL_BYTES = 4 * 2**30

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class ScratchPool:
    """Buffers keyed by (dtype, numel), least recently used first; ``hits`` counts reuses."""

    def __init__(self) -> None:
        # (dtype, numel) -> [(buffer, use count of its storage when only the pool holds it)]
        self._bufs: OrderedDict[tuple[torch.dtype, int], list[tuple[torch.Tensor, int]]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self.pooled_bytes = 0
        self.hits = 0
        self.misses = 0

    def take(self, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A view of a free pooled buffer, or of a new one. The view is made under the lock:
        until it exists the buffer's storage looks free to the next caller."""
        key = (dtype, math.prod(shape))
        with self._lock:
            for buf, alone in self._bufs.get(key, ()):
                if _storage_refs(buf) == alone:
                    self._bufs.move_to_end(key)
                    self.hits += 1
                    return buf.view(shape)
            self.misses += 1
            return self._add(key, hugepages.empty((key[1],), like, dtype)).view(shape)

    def clear(self) -> None:
        """Drop every pooled buffer (each is freed once no tensor uses it)."""
        with self._lock:
            self._bufs.clear()
            self.pooled_bytes = 0

    def _add(self, key: tuple[torch.dtype, int], buf: torch.Tensor) -> torch.Tensor:
        nbytes = buf.numel() * buf.dtype.itemsize
        if nbytes > MAX_POOL_BYTES:
            return buf
        while self._bufs and self.pooled_bytes + nbytes > MAX_POOL_BYTES:
            old_key, bufs = next(iter(self._bufs.items()))
            old, _ = bufs.pop(0)
            self.pooled_bytes -= old.numel() * old.dtype.itemsize
            if not bufs:
                del self._bufs[old_key]
        self._bufs.setdefault(key, []).append((buf, _storage_refs(buf)))
        self._bufs.move_to_end(key)
        self.pooled_bytes += nbytes
        return buf


_active: list[ScratchPool] = []


@contextlib.contextmanager
def scope() -> Iterator[ScratchPool]:
    """A pool for the steps run inside; its buffers are released when the scope closes."""
    pool = ScratchPool()
    _active.append(pool)
    try:
        yield pool
    finally:
        _active.remove(pool)
        pool.clear()


def empty(
    shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Uninitialised tensor on `like`'s device (and dtype unless given); on CPU, inside a
    `scope()` and when large, a pooled buffer that no live tensor shares."""
    dtype = dtype or like.dtype
    numel = math.prod(shape)
    pool = _active[-1] if _active else None
    if (
        pool is None
        or like.device.type != "cpu"
        or _use_count is None
        or numel * dtype.itemsize < MIN_BYTES
    ):
        return torch.empty(shape, dtype=dtype, device=like.device)
    return pool.take(shape, like, dtype)


def clear() -> None:
    """Empty the innermost open pool (if any)."""
    if _active:
        _active[-1].clear()


def pooled_bytes() -> int:
    return _active[-1].pooled_bytes if _active else 0


def _storage_refs(buf: torch.Tensor) -> int:
    return _use_count(buf.untyped_storage()._cdata)
