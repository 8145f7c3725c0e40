"""A mixture's manifest: the shards of every source in one list per split, tagged.

Each source is assembled on its own (its own dedup, packing and val split,
written under ``train/{source}/`` and ``val/{source}/``), so a row never holds
tokens of two sources and a source's share can be set at training time. The
manifest's splits list every source's shards, in ``data.sources`` order, each
with its ``source``; ``mixture`` holds each source's weight, ``max_epochs`` and
counts, which the training sampler reads (``jobs/train/sampler.py``).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import SourceConfig
from pipeline.manifest import SPLITS

_SUMMED = ("documents", "tokens", "rows", "remainder_tokens")


def combine(parts: list[tuple[SourceConfig, dict[str, Any]]], tagged: bool) -> dict[str, Any]:
    """One build's stats from its sources' ``Assembler.finish()``; ``tagged``: a mixture
    (shards carry their source, and ``mixture`` lists the sources)."""
    splits = {}
    for split in SPLITS:
        splits[split] = {k: sum(p[1]["splits"][split][k] for p in parts) for k in _SUMMED}
        splits[split]["shards"] = [
            {**shard, "source": source.name} if tagged else shard
            for source, stats in parts
            for shard in stats["splits"][split]["shards"]
        ]
    rows_from_train = sum(stats["val_split"]["rows_from_train"] for _, stats in parts)
    return {
        "splits": splits,
        "val_split": {
            "method": "train_tail" if rows_from_train else "document_hash",
            "rows_from_train": rows_from_train,
        },
        "duplicates_removed": sum(stats["duplicates_removed"] for _, stats in parts),
        "near_duplicates": _near(parts),
        "records_in": sum(stats["records_in"] for _, stats in parts),
        "mixture": [entry(source, stats) for source, stats in parts] if tagged else None,
    }


def entry(source: SourceConfig, stats: dict[str, Any]) -> dict[str, Any]:
    splits = stats["splits"]
    return {
        "name": source.name,
        "weight": source.weight,
        "max_epochs": source.max_epochs,
        "tokens": sum(splits[s]["tokens"] for s in SPLITS),
        "rows": {s: splits[s]["rows"] for s in SPLITS},
        "documents": {s: splits[s]["documents"] for s in SPLITS},
        "val_split": stats["val_split"],
    }


def _near(parts: list[tuple[SourceConfig, dict[str, Any]]]) -> dict[str, Any] | None:
    found = [stats["near_duplicates"] for _, stats in parts if stats["near_duplicates"]]
    if not found:
        return None
    return {**found[0], "removed": sum(n["removed"] for n in found)}
