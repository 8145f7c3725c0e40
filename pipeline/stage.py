"""The stage contract, the record schema, and the read stage.

Following NeMo Curator's ``ProcessingStage``: a stage has a name, the columns
it needs and adds, a ``compute`` hint (stateless ``tasks`` or an ``actors``
pool for heavy state), a ``setup()`` that loads that state once per process,
and a retry-safe ``__call__`` from a pyarrow batch to a batch (or an iterator
of batches). Stages never import Ray: ``pipeline.ray_adapter`` maps them onto
``ray.data``, and ``run_sequential`` runs them in-process for tests and
benchmarks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Literal

import pyarrow as pa

from pipeline.config import PrepareConfig
from pipeline.source_readers import read_records
from pipeline.sources import SourceFile

RECORD_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("offset", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


class StageContractError(RuntimeError):
    """A stage's batches break the columns it declares: a bug in the stage, not in the data."""


class Stage:
    """``input_columns``: what ``__call__`` needs; ``output_columns``: what it adds or
    rewrites. Every other column it returns must pass through unchanged."""

    name = "stage"
    input_columns: tuple[str, ...] = ()
    output_columns: tuple[str, ...] = ()
    compute: Literal["tasks", "actors"] = "tasks"
    batch_size: int | None = None

    _ready = False
    _contract_checked = False

    def setup(self) -> None:
        """Load heavy state (a tokenizer); runs once per worker process."""

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def __call__(self, batch: pa.Table) -> pa.Table | Iterator[pa.Table]:
        raise NotImplementedError

    def run(self, batch: pa.Table) -> Iterator[pa.Table]:
        """``__call__``'s tables, the first checked against the declared columns.

        Once per stage instance (per task or actor under Ray), so the check costs
        one comparison of the passed-through columns of one batch."""
        check = not self._contract_checked
        if check:
            check_inputs(self, batch)
        out = self(batch)
        for table in [out] if isinstance(out, pa.Table) else out:
            if check:
                check_outputs(self, batch, table)
                self._contract_checked = True
                check = False
            yield table


def check_inputs(stage: Stage, batch: pa.Table) -> None:
    for name in stage.input_columns:
        if name not in batch.column_names:
            raise StageContractError(
                f"stage {stage.name!r}: input column {name!r} is missing "
                f"(the batch has {batch.column_names})"
            )


def check_outputs(stage: Stage, batch: pa.Table, out: pa.Table) -> None:
    for name in stage.output_columns:
        if name not in out.column_names:
            raise StageContractError(
                f"stage {stage.name!r}: declared output column {name!r} is missing from its output"
            )
    for name in out.column_names:
        if name in stage.output_columns:
            continue
        if name not in batch.column_names:
            raise StageContractError(
                f"stage {stage.name!r} adds column {name!r}, which is not in its output_columns"
            )
        if _changed(batch, out, name):
            raise StageContractError(
                f"stage {stage.name!r} changes column {name!r}, which is not in its output_columns"
            )


def _changed(batch: pa.Table, out: pa.Table, name: str) -> bool:
    """A changed type, or, where the rows line up one to one, changed values."""
    before, after = batch.column(name), out.column(name)
    if before.type != after.type:
        return True
    return batch.num_rows == out.num_rows and not before.equals(after)


def file_groups(sources: list[SourceFile], max_bytes: int = 8 << 20, max_files: int = 256):
    """Consecutive files bundled into about 32 work items of at most ``max_bytes``.

    Bundling keeps a corpus of many small files (the stdlib) from paying one
    Ray task per file, while enough bundles remain to keep every worker busy;
    consecutive bundles keep the stable order cheap.
    """
    total = sum(max(s.size, 0) for s in sources)
    target = min(max_bytes, max(1, total // 32))
    group: list[dict] = []
    size = 0
    for src in sources:
        group.append(src.to_dict())
        size += max(src.size, 0)
        if size >= target or len(group) >= max_files:
            yield {"files": json.dumps(group)}
            group, size = [], 0
    if group:
        yield {"files": json.dumps(group)}


class ReadStage(Stage):
    """File bundles -> records (documents and quarantined records), in file order."""

    name = "read"
    input_columns = ("files",)
    output_columns = tuple(RECORD_SCHEMA.names)
    batch_size = 1

    def __init__(self, cfg: PrepareConfig, max_records: int = 2048, max_chars: int = 4 << 20):
        self.cfg = cfg
        self.max_records = max_records
        self.max_chars = max_chars

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for files in batch.column("files").to_pylist():
            yield from self._read_bundle([SourceFile.from_dict(d) for d in json.loads(files)])

    def _read_bundle(self, sources: list[SourceFile]) -> Iterator[pa.Table]:
        rows: list[tuple] = []
        chars = 0
        for src in sources:
            for text, line, offset, reason, detail in read_records(src, self.cfg):
                rows.append((text, src.uri, line, offset, reason, detail))
                chars += len(text) if text else 0
                if len(rows) >= self.max_records or chars >= self.max_chars:
                    yield records_table(rows)
                    rows, chars = [], 0
        if rows:
            yield records_table(rows)


def records_table(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows, strict=True))
    return pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, RECORD_SCHEMA, strict=True)],
        schema=RECORD_SCHEMA,
    )


def run_sequential(items: Iterable[dict], stages: list[Stage]) -> Iterator[pa.Table]:
    """The same dataflow as the Ray adapter, in this process, in order."""
    for stage in stages:
        stage.ensure_setup()

    def apply(tables: Iterable[pa.Table], stage: Stage) -> Iterator[pa.Table]:
        for table in tables:
            for part in _rebatch(table, stage.batch_size):
                yield from stage.run(part)

    tables: Iterable[pa.Table] = (pa.Table.from_pylist([item]) for item in items)
    for stage in stages:
        tables = apply(tables, stage)
    yield from tables


def _rebatch(table: pa.Table, size: int | None) -> Iterator[pa.Table]:
    if size is None or table.num_rows <= size:
        yield table
        return
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size)
