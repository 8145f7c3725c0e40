"""``prepare``: corpus in, committed dataset out (or the one already committed).

list sources -> fingerprint -> cache hit? -> tokenizer (load, or train on a
sample of the cleaned stream) -> read+clean (tasks) -> tokenize (actor pool)
-> ordered pack + write in the driver -> tokenizer.json -> list and verify ->
manifest.json last. A run killed at any point leaves no manifest; the rerun
has the same fingerprint and rewrites the same files, then commits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import ray_adapter
from pipeline.assemble import Assembler
from pipeline.clean import CleanStage
from pipeline.config import PrepareConfig
from pipeline.errors import StorageError
from pipeline.fingerprint import fingerprint
from pipeline.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    has_manifest,
    now_iso,
    read_manifest,
    write_manifest,
)
from pipeline.progress import Progress
from pipeline.sources import SourceFile, list_sources
from pipeline.stage import ReadStage, Stage, file_groups, run_sequential
from pipeline.storage import is_remote, join, list_files, remove, write_bytes_atomic
from pipeline.tokenize_stage import TokenizeStage
from pipeline.tokenizer import (
    TokenizerBundle,
    bundle,
    read_tokenizer_json,
    tokenizer_identity,
    train_bpe,
)
from pipeline.writer import token_dtype

Executor = Literal["ray", "local"]
Runner = Callable[[list[dict], list[Stage]], Iterator[pa.Table]]


@dataclass
class PrepareResult:
    uri: str
    manifest: dict[str, Any]
    cache_hit: bool
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


def dataset_uri(root: str, cfg: PrepareConfig, fp: str) -> str:
    """Absolute for local roots: Ray workers do not share the driver's working directory."""
    if not is_remote(root):
        root = os.path.abspath(root.removeprefix("file://"))
    return join(root, "datasets", cfg.name, fp)


def prepare(
    cfg: PrepareConfig, root: str, progress: bool = True, executor: Executor = "ray"
) -> PrepareResult:
    """Build (or find) the dataset for ``cfg`` under ``root``; ``executor="local"`` runs
    the same stages in this process without Ray (tests, benchmarks)."""
    start = time.monotonic()
    sources = list_sources(cfg.inputs, cfg.s3)
    fp = fingerprint(sources, cfg, tokenizer_identity(cfg))
    uri = dataset_uri(root, cfg, fp)
    if has_manifest(uri, cfg.s3):
        return PrepareResult(uri, read_manifest(uri, cfg.s3), True, time.monotonic() - start)
    run = _runner(executor, cfg)
    items = list(file_groups(sources))
    with Progress(progress) as bar:
        bar.status("training tokenizer" if not cfg.tokenizer else "loading tokenizer")
        tok = _tokenizer(cfg, items)
        stages = [ReadStage(cfg), CleanStage(cfg.clean), _tokenize_stage(cfg, tok)]
        assembler = Assembler(cfg, uri, token_dtype(cfg.vocab_size))
        with closing(run(items, stages)) as tables:
            for table in tables:
                assembler.consume(table)
                bar.update(assembler)
                if assembler.done:
                    break
        stats = assembler.finish()
    write_bytes_atomic(join(uri, "tokenizer.json"), tok.json.encode("utf-8"), cfg.s3)
    seconds = time.monotonic() - start
    manifest = _manifest(cfg, fp, sources, tok, stats, seconds)
    _verify_and_tidy(uri, manifest, cfg)
    write_manifest(uri, manifest, cfg.s3)
    return PrepareResult(uri, manifest, False, seconds, stats)


def _runner(executor: Executor, cfg: PrepareConfig) -> Runner:
    if executor == "local":
        return run_sequential
    ray_adapter.ensure_ray()
    return lambda items, stages: ray_adapter.stream(items, stages, cfg.num_workers)


def _tokenize_stage(cfg: PrepareConfig, tok: TokenizerBundle) -> TokenizeStage:
    return TokenizeStage(tok.json, tok.special_ids["eos"], cfg.batch_size)


def _tokenizer(cfg: PrepareConfig, items: list[dict]) -> TokenizerBundle:
    if cfg.tokenizer:
        from tokenizers import Tokenizer

        return bundle(Tokenizer.from_str(read_tokenizer_json(cfg.tokenizer, cfg.s3)), cfg)
    sample = _sample_texts(cfg, items)
    return bundle(train_bpe(sample, cfg.vocab_size, cfg.special_tokens), cfg)


def _sample_texts(cfg: PrepareConfig, items: list[dict]) -> Iterator[str]:
    """The first ``tokenizer_sample_chars`` characters of cleaned documents, in stable order.

    Read in this process: the sample is bounded, and a second Ray Data run would
    cost more in start-up than the reading does."""
    budget = cfg.tokenizer_sample_chars
    with closing(run_sequential(items, [ReadStage(cfg), CleanStage(cfg.clean)])) as tables:
        for table in tables:
            for text in table.filter(pc.is_null(table.column("reason")))["text"].to_pylist():
                yield text[:budget]
                budget -= len(text)
                if budget <= 0:
                    return


def _manifest(
    cfg: PrepareConfig,
    fp: str,
    sources: list[SourceFile],
    tok: TokenizerBundle,
    stats: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    tokens = sum(s["tokens"] for s in stats["splits"].values())
    return {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "fingerprint": fp,
        "created_at": now_iso(),
        "seq_len": cfg.seq_len,
        "row_len": cfg.row_len,
        "dtype": token_dtype(cfg.vocab_size).name,
        "vocab_size": cfg.vocab_size,
        "special_tokens": dict(tok.special_ids),
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "trained": cfg.tokenizer is None,
        },
        "splits": stats["splits"],
        "quarantine": stats["quarantine"],
        "duplicates_removed": stats["duplicates_removed"],
        "records_read": stats["records_in"],
        "sources": [s.listing_entry() for s in sources],
        "config": cfg.public_view(),
        "build": {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / max(seconds, 1e-9))},
    }


def _verify_and_tidy(uri: str, manifest: dict[str, Any], cfg: PrepareConfig) -> None:
    """List the folder: every shard must be there at its size; files a killed run left
    behind (temporary names, shards of an older attempt) go."""
    present = list_files(uri, cfg.s3)
    wanted = {"tokenizer.json", *manifest["quarantine"]["files"]}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            wanted.add(shard["path"])
            if shard["path"] not in present:
                raise StorageError(f"shard {shard['path']} is missing from {uri} after writing")
    for rel in sorted(set(present) - wanted - {MANIFEST}):
        remove(join(uri, rel), cfg.s3)
