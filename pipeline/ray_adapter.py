"""The one place that maps stages onto ``ray.data``.

``tasks`` stages become stateless ``map_batches`` tasks; ``actors`` stages an
actor pool whose actors run ``setup()`` once. Both run a stage through
``Stage.run``, which checks its declared columns on its first batch. Three
settings matter:

- ``preserve_order``: the stream reaches the driver in input order whatever
  the parallelism, which the ordered packing relies on.
- Tasks and actors ask for different CPU shares, which keeps Ray Data from
  fusing them: fused, the actor's batch size would bundle many file groups
  into one task (one busy actor), and actors holding every CPU would starve
  the read tasks. One actor per CPU at 0.75 leaves a quarter CPU each for
  the (light) read and clean tasks.
- ``BLOCK_BYTES``: blocks of at most a few MB instead of 128 MB, so what is in
  flight, and so peak memory, does not grow with the corpus.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa

from pipeline.stage import Stage

ACTOR_CPUS = 0.75
TASK_CPUS = 0.25
BLOCK_BYTES = 8 << 20


def ensure_ray(log_to_driver: bool = False) -> None:
    """Use the Ray the caller started; inside a Ray job (``RAY_ADDRESS`` set) join that
    cluster; else start a local one. Never ``address="auto"``: a cluster that some
    ``ray start`` left on this machine must not get work by surprise."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)))


def _task_fn(stage: Stage):
    def run(batch: pa.Table) -> Iterator[pa.Table]:
        stage.ensure_setup()
        yield from stage.run(batch)

    run.__name__ = stage.name
    return run


class _StageActor:
    def __init__(self, stage: Stage):
        self.stage = stage
        self.stage.ensure_setup()

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        yield from self.stage.run(batch)


def build(items: list[dict], stages: list[Stage], num_workers: int | None = None):
    import ray.data

    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    for stage in stages:
        common = dict(batch_size=stage.batch_size, batch_format="pyarrow", zero_copy_batch=True)
        if stage.compute == "actors":
            ds = ds.map_batches(
                _StageActor,
                fn_constructor_args=(stage,),
                compute=ray.data.ActorPoolStrategy(size=num_workers or cluster_cpus()),
                num_cpus=ACTOR_CPUS,
                **common,
            )
        else:
            ds = ds.map_batches(_task_fn(stage), num_cpus=TASK_CPUS, **common)
    return ds


@contextmanager
def _ordered_context() -> Iterator[None]:
    """``preserve_order`` for our datasets only: the caller's DataContext is restored."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (
        ctx.execution_options.preserve_order,
        ctx.enable_progress_bars,
        ctx.target_max_block_size,
    )
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved[:2]
        ctx.target_max_block_size = saved[2]


def stream(items: list[dict], stages: list[Stage], num_workers: int | None = None):
    """The stages' output, in input order, as pyarrow tables (empty ones skipped)."""
    with _ordered_context():
        ds = build(items, stages, num_workers)
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            if table.num_rows:
                yield table
