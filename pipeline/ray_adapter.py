"""The one place that maps stages onto ``ray.data``.

``tasks`` stages become stateless ``map_batches`` tasks (consecutive ones are
fused by Ray Data); ``actors`` stages become an actor pool whose actors run
``setup()`` once. ``preserve_order`` makes the stream reach the driver in input
order whatever the parallelism, which is what the ordered packing relies on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa

from pipeline.stage import Stage


def ensure_ray() -> None:
    """Use the Ray the caller started, else a local one (never a remote cluster by surprise)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)))


def default_workers() -> int:
    """One tokenizer actor per CPU: Ray Data fuses read and clean into the actors."""
    return cluster_cpus()


def _task_fn(stage: Stage):
    def run(batch: pa.Table) -> Iterator[pa.Table]:
        stage.ensure_setup()
        out = stage(batch)
        if isinstance(out, pa.Table):
            yield out
        else:
            yield from out

    run.__name__ = stage.name
    return run


class _StageActor:
    def __init__(self, stage: Stage):
        self.stage = stage
        self.stage.ensure_setup()

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        out = self.stage(batch)
        if isinstance(out, pa.Table):
            yield out
        else:
            yield from out


def build(items: list[dict], stages: list[Stage], num_workers: int | None = None):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    for stage in stages:
        common = dict(batch_size=stage.batch_size, batch_format="pyarrow", zero_copy_batch=True)
        if stage.compute == "actors":
            ds = ds.map_batches(
                _StageActor,
                fn_constructor_args=(stage,),
                compute=ray.data.ActorPoolStrategy(size=num_workers or default_workers()),
                num_cpus=1,
                **common,
            )
        else:
            ds = ds.map_batches(_task_fn(stage), num_cpus=1, **common)
    return ds


def stream(items: list[dict], stages: list[Stage], num_workers: int | None = None):
    """The stages' output, in input order, as pyarrow tables (empty ones skipped)."""
    ds = build(items, stages, num_workers)
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        if table.num_rows:
            yield table
