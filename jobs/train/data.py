"""Training batches from the packed Parquet shards, in sampler order, loaded ahead.

A background thread turns sample indices into int64 tensors (pinned on GPU
hosts) and keeps ``prefetch`` micro batches queued; shard files are read by a
small pool a few steps before they are needed, so the training loop only waits
when storage is slower than compute. ``DatasetReader.read_shard`` verifies each
shard's sha256 when it is opened.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from jobs.train.mixture_sampler import MixtureSampler
from jobs.train.sampler import Sampler, micro_batch_samples

_LOOKAHEAD_STEPS = 4


class ShardCache:
    """Decoded shards of one split, least recently used evicted first, loaded in a pool."""

    def __init__(self, reader, split: str, capacity: int, workers: int = 2) -> None:
        self.reader = reader
        self.split = split
        self.capacity = max(1, capacity)
        self._futures: OrderedDict[int, Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"shards-{split}")
        self._lock = threading.Lock()

    def prefetch(self, shards) -> None:
        with self._lock:
            for s in dict.fromkeys(int(x) for x in shards):
                if s in self._futures:
                    self._futures.move_to_end(s)
                else:
                    self._futures[s] = self._pool.submit(self.reader.read_shard, self.split, s)
            while len(self._futures) > self.capacity:
                self._futures.popitem(last=False)

    def get(self, shard: int) -> np.ndarray:
        self.prefetch([shard])
        return self._futures[shard].result()

    def rows(self, shard_ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Rows ``offsets[i]`` of shards ``shard_ids[i]``, in the order given."""
        out = None
        for s in np.unique(shard_ids):
            mask = shard_ids == s
            data = self.get(int(s))
            if out is None:
                out = np.empty((len(shard_ids), data.shape[1]), dtype=data.dtype)
            out[mask] = data[offsets[mask]]
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def to_tensor(rows: np.ndarray, pin: bool) -> torch.Tensor:
    t = torch.from_numpy(rows.astype(np.int64))
    return t.pin_memory() if pin else t


class TrainBatches:
    """Yields each optimizer step's micro batches for one rank, from ``start_sample`` on."""

    def __init__(
        self,
        reader,
        sampler: Sampler | MixtureSampler,
        rank: int,
        world: int,
        micro_batch: int,
        accum: int,
        start_sample: int,
        device: torch.device,
        prefetch: int = 4,
    ) -> None:
        self.sampler = sampler
        self.rank, self.world = rank, world
        self.micro_batch, self.accum = micro_batch, accum
        self.global_batch = micro_batch * world * accum
        self.start_sample = start_sample
        self.device = device
        self.cache = ShardCache(reader, "train", capacity=2 * sampler.window + 2)
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, accum))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="train-batches", daemon=True)
        self._thread.start()

    def _rows_for(self, step_index: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        step_start = self.start_sample + step_index * self.global_batch
        first, count = micro_batch_samples(
            step_start, self.rank, self.world, micro, self.micro_batch
        )
        return self.sampler.locate(self.sampler.rows(first, count))

    def _produce(self) -> None:
        pin = self.device.type == "cuda"
        step = 0
        try:
            while not self._stop.is_set():
                for m in range(self.accum):
                    ahead, _ = self._rows_for(step + _LOOKAHEAD_STEPS, m)
                    self.cache.prefetch(ahead)
                    shards, offsets = self._rows_for(step, m)
                    self._put(to_tensor(self.cache.rows(shards, offsets), pin))
                step += 1
        except Exception as e:
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_step(self) -> tuple[list[torch.Tensor], float]:
        """The next step's micro batches on the device, and the seconds spent waiting."""
        start = time.perf_counter()
        batches = []
        for _ in range(self.accum):
            item = self._queue.get()
            if isinstance(item, Exception):
                raise item
            batches.append(item.to(self.device, non_blocking=True))
        return batches, time.perf_counter() - start

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.cache.close()


def val_batches(
    reader,
    rank: int,
    world: int,
    micro_batch: int,
    num_batches: int,
    shards: list[int] | None = None,
) -> list[torch.Tensor]:
    """A fixed validation set: the first rows of the split (or of its ``shards``, one
    source of a mixture) in order, wrapped if it is small."""
    ids = np.asarray(range(len(reader.shards("val"))) if shards is None else shards, np.int64)
    all_rows = [s["rows"] for s in reader.shards("val")]
    shard_rows = [all_rows[i] for i in ids]
    total = sum(shard_rows)
    if total == 0:
        return []
    starts = np.concatenate([[0], np.cumsum(shard_rows)])
    cache = ShardCache(reader, "val", capacity=len(shard_rows))
    out = []
    for b in range(num_batches):
        first = (b * world + rank) * micro_batch
        rows = np.arange(first, first + micro_batch) % total
        shard = np.searchsorted(starts, rows, side="right") - 1
        out.append(to_tensor(cache.rows(ids[shard], rows - starts[shard]), pin=False))
    cache.close()
    return out


def val_batches_by_source(
    reader, rank: int, world: int, micro_batch: int, num_batches: int
) -> dict[str, list[torch.Tensor]]:
    """Each mixture source's own validation set (``val/<source>/loss``); {} for one source."""
    if reader.mixture is None:
        return {}
    return {
        name: val_batches(reader, rank, world, micro_batch, num_batches, ids)
        for name, ids in reader.source_shards("val").items()
    }
