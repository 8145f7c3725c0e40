"""Reused CPU buffers for a training step's largest activations.

glibc serves a large tensor from a fresh mmap or from heap memory it has just trimmed, so a
training step page-faults its biggest buffers in again every time: 15-35k minor faults per
`tiny` step on the benchmark machine, and the forward expert GEMM ran at ~128 GFLOP/s writing
into a fresh [P, 2F] buffer against ~175 into a warm one. This pool keeps those buffers (on
transparent huge pages, `hugepages.py`) and hands one out again only while nothing but the pool
references its storage, so reuse can never be observed: a tensor saved for backward, returned
to a caller or kept across steps keeps its buffer out of the pool until the last view is freed.
On other devices the framework's caching allocator already does this: `empty` is `torch.empty`.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from moe_model import hugepages

MIN_BYTES = 1 * 2**20
# Pooled bytes kept at most; the least recently used buffers are dropped beyond it.
MAX_POOL_BYTES = 4 * 2**30

_use_count = getattr(torch._C, "_storage_Use_Count", None)
# (dtype, numel) -> [(buffer, use count of its storage when only the pool holds it)], LRU first.
_pool: OrderedDict[tuple[torch.dtype, int], list[tuple[torch.Tensor, int]]] = OrderedDict()
_pooled_bytes = 0


def empty(
    shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Uninitialised tensor on `like`'s device (and dtype unless given); on CPU and when large,
    a pooled buffer that no live tensor shares."""
    dtype = dtype or like.dtype
    numel = math.prod(shape)
    if like.device.type != "cpu" or _use_count is None or numel * dtype.itemsize < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=like.device)
    key = (dtype, numel)
    for buf, alone in _pool.get(key, ()):
        if _storage_refs(buf) == alone:
            _pool.move_to_end(key)
            return buf.view(shape)
    return _add(key, hugepages.empty((numel,), like, dtype)).view(shape)


def clear() -> None:
    """Drop every pooled buffer (each is freed once no tensor uses it)."""
    global _pooled_bytes
    _pool.clear()
    _pooled_bytes = 0


def pooled_bytes() -> int:
    return _pooled_bytes


def _storage_refs(buf: torch.Tensor) -> int:
    return _use_count(buf.untyped_storage()._cdata)


def _add(key: tuple[torch.dtype, int], buf: torch.Tensor) -> torch.Tensor:
    global _pooled_bytes
    nbytes = buf.numel() * buf.dtype.itemsize
    if nbytes > MAX_POOL_BYTES:
        return buf
    while _pool and _pooled_bytes + nbytes > MAX_POOL_BYTES:
        old_key, bufs = next(iter(_pool.items()))
        old, _ = bufs.pop(0)
        _pooled_bytes -= old.numel() * old.dtype.itemsize
        if not bufs:
            del _pool[old_key]
    _pool.setdefault(key, []).append((buf, _storage_refs(buf)))
    _pool.move_to_end(key)
    _pooled_bytes += nbytes
    return buf
