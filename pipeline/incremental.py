"""Incremental prepare: when only new files appeared, tokenize those and reuse the earlier shards.

A committed dataset of the same name is a *base* for a new source listing when
its output-relevant config and tokenizer identity equal ours and its listing
is a strict subset of ours with every shared file unchanged (same path, size
and mtime or ETag). Any other difference (a file changed or gone, a config
change) finds no base, so the build is a full one.

The new dataset keeps the base's tokenizer (token ids must stay compatible
with models trained on the base), dedups its new documents against the base's
stored document hashes, and lists the base's shards by a path relative to its
own folder (``../{base}/train/part-00000.parquet``, resolved by the reader and
checked by sha256 like any shard) before its own. The base's packing tail
(its ``remainder_tokens``) stays dropped: rows never span two builds.
Its fingerprint hashes the base's too, so it never shares a folder with the
full build of the same listing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import RUNTIME_ONLY, PrepareConfig
from pipeline.doc_hashes import read_doc_hashes
from pipeline.errors import ChecksumError, ManifestError, StorageError
from pipeline.manifest import read_manifest
from pipeline.sources import SourceFile
from pipeline.storage import filesystem, is_remote, join, list_files, read_bytes, resolve
from pipeline.tokenizer import TokenizerBundle, bundle

# Keys that may differ between a base and its extension: the runtime-only ones, and the
# input URIs themselves (a new input folder may be how the new files arrive).
_FREE_KEYS = frozenset({*RUNTIME_ONLY, "inputs"})
_SUMMED = ("documents", "tokens", "rows", "remainder_tokens")


@dataclass(frozen=True)
class Found:
    """A committed dataset for our listing (``same``) or a base to extend."""

    uri: str
    manifest: dict[str, Any]
    same: bool

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


def applies(cfg: PrepareConfig) -> bool:
    """``max_documents`` keeps the first N documents of the whole listing, which an
    extension of a base cannot honour; near-duplicate removal would need the base's
    MinHash signatures, which are not stored; a mixture is not extended yet. Such configs
    always build in full."""
    simple = cfg.max_documents is None and not cfg.near_dup.enabled and cfg.sources is None
    return cfg.incremental and simple


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """``near_dup`` off and ``sources`` unset are left out: builds from before those keys
    existed stay bases."""
    view = {k: v for k, v in config.items() if k not in _FREE_KEYS}
    if (view.get("near_dup") or {}).get("threshold") is None:
        view.pop("near_dup", None)
    if view.get("sources") is None:
        view.pop("sources", None)
    return view


def find(
    parent_uri: str, cfg: PrepareConfig, sources: list[SourceFile], identity: str
) -> Found | None:
    """The newest committed dataset under ``parent_uri`` for exactly ``sources``, else the
    base covering the most of them (newest first on a tie), else None."""
    ours = {e["path"]: e for e in (s.listing_entry() for s in sources)}
    want = comparable(cfg.public_view())
    same, bases = [], []
    for uri, m in _committed(parent_uri, cfg):
        if comparable(m["config"]) != want or m["tokenizer"].get("identity") != identity:
            continue
        if "doc_hashes" not in m:
            continue
        theirs = {e["path"]: e for e in m["sources"]}
        if theirs == ours:
            same.append(Found(uri, m, True))
        elif len(theirs) < len(ours) and all(ours.get(p) == e for p, e in theirs.items()):
            bases.append(Found(uri, m, False))
    if same:
        return max(same, key=_newest)
    return max(bases, key=lambda f: (len(f.manifest["sources"]), *_newest(f)), default=None)


def _newest(found: Found) -> tuple[str, str]:
    return found.manifest["created_at"], found.fingerprint


def _committed(parent_uri: str, cfg: PrepareConfig):
    fs, path = filesystem(parent_uri, cfg.s3)
    if is_remote(parent_uri):
        fs.invalidate_cache()
    if not fs.exists(path):
        return
    for info in fs.ls(path, detail=True):
        if info.get("type") != "directory":
            continue
        uri = join(parent_uri, posixpath.basename(info["name"].rstrip("/")))
        try:
            yield uri, read_manifest(uri, cfg.s3)
        except ManifestError:
            continue


def new_sources(base: Found, sources: list[SourceFile]) -> list[SourceFile]:
    known = {e["path"] for e in base.manifest["sources"]}
    return [s for s in sources if s.listing_entry()["path"] not in known]


def base_tokenizer(base: Found, cfg: PrepareConfig) -> TokenizerBundle:
    """The base's tokenizer, byte for byte (so its sha256 is unchanged), checked against cfg."""
    from tokenizers import Tokenizer

    info = base.manifest["tokenizer"]
    data = read_bytes(resolve(base.uri, info["file"]), cfg.s3)
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise ChecksumError(f"{info['file']} of {base.uri}: sha256 does not match the manifest")
    text = data.decode("utf-8")
    return dataclasses.replace(bundle(Tokenizer.from_str(text), cfg), json=text)


def base_hashes(base: Found, cfg: PrepareConfig) -> np.ndarray:
    return read_doc_hashes(base.uri, base.manifest, cfg.s3)


def rebase(base: Found, path: str) -> str:
    """``path`` of the base's manifest, as seen from a sibling folder."""
    if "://" in path or path.startswith("/"):
        return path
    return posixpath.normpath(posixpath.join("..", base.fingerprint, path))


def extend(base: Found, own: dict[str, Any], added: list[SourceFile]) -> dict[str, Any]:
    """The manifest of base + this build: base entries first, counts summed, the delta kept
    under ``incremental``."""
    b = base.manifest
    splits = {}
    for name, split in own["splits"].items():
        old = b["splits"][name]
        splits[name] = {k: old[k] + split[k] for k in _SUMMED}
        splits[name]["shards"] = [
            {**s, "path": rebase(base, s["path"])} for s in old["shards"]
        ] + split["shards"]
    reasons = Counter(b["quarantine"]["by_reason"]) + Counter(own["quarantine"]["by_reason"])
    delta = {
        "base": base.fingerprint,
        "new_sources": [s.listing_entry() for s in added],
        "records_read": own["records_read"],
        "duplicates_removed": own["duplicates_removed"],
        "splits": {n: {k: s[k] for k in _SUMMED} for n, s in own["splits"].items()},
        "base_remainder_tokens": {n: s["remainder_tokens"] for n, s in b["splits"].items()},
        "val_split": own["val_split"],
    }
    return {
        **own,
        "splits": splits,
        "val_split": _val_split(b.get("val_split"), own["val_split"]),
        "quarantine": {
            "total": b["quarantine"]["total"] + own["quarantine"]["total"],
            "by_reason": dict(sorted(reasons.items())),
            "files": [rebase(base, f) for f in b["quarantine"]["files"]]
            + own["quarantine"]["files"],
        },
        "duplicates_removed": b["duplicates_removed"] + own["duplicates_removed"],
        "records_read": b["records_read"] + own["records_read"],
        "doc_hashes": [{**e, "path": rebase(base, e["path"])} for e in b["doc_hashes"]]
        + own["doc_hashes"],
        "incremental": delta,
    }


def _val_split(base: dict[str, Any] | None, own: dict[str, Any]) -> dict[str, Any]:
    """Each build made its own val split; rows taken from train tails add up."""
    base = base or {"method": "document_hash", "rows_from_train": 0}
    rows = base["rows_from_train"] + own["rows_from_train"]
    return {"method": "train_tail" if rows else "document_hash", "rows_from_train": rows}


def check_references(dataset_uri: str, paths: list[str], cfg: PrepareConfig) -> None:
    """Every reused file must still be in its folder: one listing per referenced dataset."""
    listings: dict[str, dict[str, int]] = {}
    for path in paths:
        up, name, rel = path.split("/", 2)
        assert up == "..", path
        folder = f"../{name}"
        if folder not in listings:
            listings[folder] = list_files(resolve(dataset_uri, folder), cfg.s3)
        if rel not in listings[folder]:
            raise StorageError(f"reused file {path} of {dataset_uri} is missing")
