"""``prepare``: corpus in, committed dataset out (or the one already committed).

list sources (each of a mixture's) -> fingerprint -> cache hit? -> base to extend? (see
``pipeline.incremental``) -> tokenizer (the base's, loaded, or trained on a
sample of the cleaned stream) -> read+clean (tasks) -> tokenize (actor pool)
(MinHash signatures too, when near-dedup is on) -> ordered pack + write in the
driver, one source after another -> tokenizer.json, doc_hashes.npy ->
list and verify -> manifest.json last. A run killed at any point leaves no
manifest; the rerun has the same fingerprint and rewrites the same files,
then commits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import incremental, mixture, ray_adapter
from pipeline.assemble import Assembler
from pipeline.clean import CleanStage
from pipeline.config import PrepareConfig, SourceConfig
from pipeline.doc_hashes import FILE as DOC_HASHES
from pipeline.doc_hashes import write_doc_hashes
from pipeline.errors import StorageError
from pipeline.fingerprint import fingerprint
from pipeline.locks import storage_lock
from pipeline.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    has_manifest,
    now_iso,
    read_manifest,
    uncommit,
    write_manifest,
)
from pipeline.minhash_stage import MinHashStage
from pipeline.progress import Progress
from pipeline.quarantine import QuarantineWriter
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


def datasets_uri(root: str, cfg: PrepareConfig) -> str:
    """``{root}/datasets/{name}``: every build of this dataset name, one folder each.

    Absolute for local roots: Ray workers do not share the driver's working directory."""
    if not is_remote(root):
        root = os.path.abspath(root.removeprefix("file://"))
    return join(root, "datasets", cfg.name)


def dataset_uri(root: str, cfg: PrepareConfig, fp: str) -> str:
    return join(datasets_uri(root, cfg), fp)


@dataclass
class _Plan:
    """Where the dataset for this config lives, and whether it is committed or extends one."""

    sources: list[SourceFile]
    identity: str
    # The listing of each source of the mixture (one, for a config without ``data.sources``).
    groups: list[tuple[SourceConfig, list[SourceFile]]]
    fp: str
    uri: str
    base: incremental.Found | None = None
    committed: dict[str, Any] | None = None


def prepare(
    cfg: PrepareConfig,
    root: str,
    progress: bool = True,
    executor: Executor = "ray",
    force: bool = False,
) -> PrepareResult:
    """Build (or find) the dataset for ``cfg`` under ``root``; ``executor="local"`` runs
    the same stages in this process without Ray (tests, benchmarks). ``force`` rebuilds
    in full, in place, even when the dataset is committed or could extend an earlier one."""
    start = time.monotonic()
    # A missing input or a bad tokenizer is the user's error: say so before the lock
    # touches the storage root.
    groups = [(src, list_sources(src.inputs, cfg.s3)) for src in cfg.mixture]
    identity = tokenizer_identity(cfg)
    # Two prepares of one dataset name would delete each other's files (the tidy step
    # removes what its own manifest does not list): the second waits, then is a cache hit.
    with storage_lock(datasets_uri(root, cfg) + ".lock", cfg.s3):
        plan = _plan(cfg, root, force, groups, identity)
        if plan.committed is not None:
            return PrepareResult(plan.uri, plan.committed, True, time.monotonic() - start)
        return _build(cfg, plan, executor, progress, start)


def _plan(cfg: PrepareConfig, root: str, force: bool, groups: list, identity: str) -> _Plan:
    sources = [f for _, files in groups for f in files]
    fp = fingerprint(sources, cfg, identity)
    plan = _Plan(sources, identity, groups, fp, dataset_uri(root, cfg, fp))
    if force:
        uncommit(plan.uri, cfg.s3)
        return plan
    if has_manifest(plan.uri, cfg.s3):
        plan.committed = read_manifest(plan.uri, cfg.s3)
        return plan
    found = None
    if incremental.applies(cfg):
        found = incremental.find(datasets_uri(root, cfg), cfg, sources, identity)
    if found is None:
        return plan
    if found.same:
        return _Plan(
            sources, identity, groups, found.fingerprint, found.uri, committed=found.manifest
        )
    fp = fingerprint(sources, cfg, identity, found.fingerprint)
    return _Plan(sources, identity, groups, fp, dataset_uri(root, cfg, fp), base=found)


def _build(
    cfg: PrepareConfig, plan: _Plan, executor: Executor, progress: bool, start: float
) -> PrepareResult:
    run = _runner(executor, cfg)
    base = plan.base
    # Incremental builds are single-source (``incremental.applies``).
    todo = incremental.new_sources(base, plan.sources) if base else plan.sources
    parts = [(src, list(file_groups(todo if base else files))) for src, files in plan.groups]
    quarantine = QuarantineWriter(plan.uri, cfg.s3)
    with Progress(progress) as bar:
        tok = _tokenizer_for(cfg, plan, [i for _, items in parts for i in items], bar)
        stages = [ReadStage(cfg), CleanStage(cfg.clean)]
        if cfg.near_dup.enabled:
            stages.append(MinHashStage(cfg.near_dup))
        stages.append(_tokenize_stage(cfg, tok))
        finished, kept_hashes = [], []
        for src, items in parts:
            assembler = _assembler(cfg, plan, quarantine, src)
            with closing(run(items, stages)) as tables:
                for table in tables:
                    assembler.consume(table)
                    bar.update(assembler)
                    if assembler.done:
                        break
            finished.append((src, assembler.finish()))
            kept_hashes += assembler.kept_hashes
        stats = mixture.combine(finished, tagged=cfg.sources is not None)
        stats["quarantine"] = quarantine.close()
    write_bytes_atomic(join(plan.uri, "tokenizer.json"), tok.json.encode("utf-8"), cfg.s3)
    kept = np.concatenate([np.empty(0, np.int64), *kept_hashes])
    hashes = write_doc_hashes(plan.uri, kept, cfg.s3)
    seconds = time.monotonic() - start
    manifest = _manifest(cfg, plan, tok, stats, seconds, hashes)
    if base:
        manifest = incremental.extend(base, manifest, todo)
    _verify_and_tidy(plan.uri, manifest, cfg)
    write_manifest(plan.uri, manifest, cfg.s3)
    return PrepareResult(plan.uri, manifest, False, seconds, stats)


def _tokenizer_for(
    cfg: PrepareConfig, plan: _Plan, items: list[dict], bar: Progress
) -> TokenizerBundle:
    """Fresh (trained on the first documents of the sources, in order), or ``plan.base``'s."""
    if plan.base is None:
        bar.status("training tokenizer" if not cfg.tokenizer else "loading tokenizer")
        return _tokenizer(cfg, items)
    bar.status(f"extending dataset {plan.base.fingerprint}")
    return incremental.base_tokenizer(plan.base, cfg)


def _assembler(
    cfg: PrepareConfig, plan: _Plan, quarantine: QuarantineWriter, src: SourceConfig
) -> Assembler:
    """One source's assembler: dedup within the source (and against ``plan.base``)."""
    dtype = token_dtype(cfg.vocab_size)
    seen = incremental.base_hashes(plan.base, cfg) if plan.base and cfg.dedup else None
    source = src.name if cfg.sources is not None else None
    return Assembler(cfg, plan.uri, dtype, seen, quarantine, source)


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
    plan: _Plan,
    tok: TokenizerBundle,
    stats: dict[str, Any],
    seconds: float,
    doc_hashes: dict[str, Any],
) -> dict[str, Any]:
    tokens = sum(s["tokens"] for s in stats["splits"].values())
    return {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "fingerprint": plan.fp,
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
            "identity": plan.identity,
        },
        "splits": stats["splits"],
        "val_split": stats["val_split"],
        "quarantine": stats["quarantine"],
        "duplicates_removed": stats["duplicates_removed"],
        "near_duplicates": stats["near_duplicates"],
        "records_read": stats["records_in"],
        **({"mixture": stats["mixture"]} if stats["mixture"] else {}),
        "doc_hashes": [doc_hashes],
        "sources": [s.listing_entry() for s in plan.sources],
        "config": cfg.public_view(),
        "build": {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / max(seconds, 1e-9))},
    }


def _verify_and_tidy(uri: str, manifest: dict[str, Any], cfg: PrepareConfig) -> None:
    """List the folder: every shard must be there, and every file reused from a base in
    the base's folder; files a killed run left behind (temporary names, shards of an
    older attempt) go."""
    present = list_files(uri, cfg.s3)
    wanted = {"tokenizer.json", DOC_HASHES, *manifest["quarantine"]["files"]}
    reused = [e["path"] for e in manifest["doc_hashes"] if e["path"].startswith("../")]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["path"].startswith("../"):
                reused.append(shard["path"])
                continue
            wanted.add(shard["path"])
            if shard["path"] not in present:
                raise StorageError(f"shard {shard['path']} is missing from {uri} after writing")
    incremental.check_references(uri, reused, cfg)
    for rel in sorted(set(present) - wanted - {MANIFEST}):
        remove(join(uri, rel), cfg.s3)
