"""Incremental prepare: a new file extends the last dataset, anything else rebuilds in full."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ChecksumError
from pipeline.prepare import prepare
from pipeline.reader import DatasetReader
from tests.pipeline.conftest import document, tiny_config, write_jsonl
from tests.pipeline.test_prepare import complete_documents

SPLITS = ("train", "val")


def docs(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [document(rng) for _ in range(n)]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    write_jsonl(root / "a.jsonl", [{"text": d} for d in docs(1, 16)])
    write_jsonl(root / "b.jsonl", [{"text": d} for d in docs(2, 16)])
    return root


def add_c(corpus: Path) -> list[str]:
    """A new file: fresh documents plus a copy of one of a.jsonl's (a duplicate)."""
    new = docs(3, 20)
    write_jsonl(corpus / "c.jsonl", [{"text": d} for d in [*new[:10], docs(1, 16)[5], *new[10:]]])
    return new


def run(corpus: Path, root: Path, **kwargs):
    force = kwargs.pop("force", False)
    return prepare(tiny_config([str(corpus)], **kwargs), str(root), False, "local", force)


def read_all(ds: DatasetReader) -> dict[str, np.ndarray]:
    """Every row of every split through the reader (checksums verified)."""
    out = {}
    for split in SPLITS:
        rows = [ds.read_shard(split, i) for i in range(len(ds.shards(split)))]
        out[split] = np.concatenate(rows)
        assert len(out[split]) == ds.num_rows(split)
    return out


def new_part_stream(ds: DatasetReader, split: str, reused: int) -> np.ndarray:
    rows = [ds.read_shard(split, i) for i in range(reused, len(ds.shards(split)))]
    return np.concatenate(rows).reshape(-1) if rows else np.empty(0, ds.dtype)


def test_new_file_is_the_only_one_read_and_base_shards_are_reused(corpus, tmp_path):
    out = tmp_path / "out"
    base = run(corpus, out)
    new_docs = add_c(corpus)
    ext = run(corpus, out)
    m, b = ext.manifest, base.manifest

    assert not ext.cache_hit and ext.uri != base.uri
    assert m["incremental"]["base"] == b["fingerprint"]
    assert [s["path"] for s in m["incremental"]["new_sources"]] == [str(corpus / "c.jsonl")]
    assert ext.stats["records_in"] == len(new_docs) + 1, "only c.jsonl was read"
    assert m["incremental"]["duplicates_removed"] == 1
    assert m["duplicates_removed"] == b["duplicates_removed"] + 1
    assert len(m["sources"]) == 3
    assert m["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    assert (Path(ext.uri) / "tokenizer.json").read_bytes() == (
        Path(base.uri) / "tokenizer.json"
    ).read_bytes()

    ds = DatasetReader(ext.uri)
    for split in SPLITS:
        old, new = b["splits"][split], m["splits"][split]
        reused = new["shards"][: len(old["shards"])]
        assert [s["path"] for s in reused] == [
            f"../{b['fingerprint']}/{s['path']}" for s in old["shards"]
        ]
        assert [s["sha256"] for s in reused] == [s["sha256"] for s in old["shards"]]
        own = {p.name for p in (Path(ext.uri) / split).glob("*.parquet")}
        assert len(own) == len(new["shards"]) - len(old["shards"]), "base shards not copied"
        delta = m["incremental"]["splits"][split]
        for key in ("documents", "tokens", "rows", "remainder_tokens"):
            assert new[key] == old[key] + delta[key], (split, key)
    rows = read_all(ds)
    np.testing.assert_array_equal(
        rows["train"][: b["splits"]["train"]["rows"]], read_all(DatasetReader(base.uri))["train"]
    )

    # Token conservation over the new part: c.jsonl's documents, the duplicate left out.
    tok = ds.load_tokenizer()
    encoded = {tuple(tok.encode(d, add_special_tokens=False).ids) + (ds.eos_token_id,): d
               for d in new_docs}  # fmt: skip
    delta = m["incremental"]["splits"]
    assert sum(d["tokens"] + d["remainder_tokens"] for d in delta.values()) == sum(
        map(len, encoded)
    )
    found = []
    for split in SPLITS:
        stream = new_part_stream(ds, split, len(b["splits"][split]["shards"]))
        for ids in complete_documents(stream, ds.eos_token_id):
            found.append(encoded[(*ids, ds.eos_token_id)])
    assert len(found) == len(set(found)) >= len(new_docs) - 2

    again = run(corpus, out)
    assert again.cache_hit and again.uri == ext.uri


def test_a_chain_of_extensions_dedups_against_every_earlier_build(corpus, tmp_path):
    out = tmp_path / "out"
    first = run(corpus, out)
    c_docs = add_c(corpus)
    second = run(corpus, out)
    write_jsonl(corpus / "d.jsonl", [{"text": t} for t in [c_docs[3], *docs(4, 6), docs(2, 16)[0]]])
    third = run(corpus, out)
    m = third.manifest
    assert m["incremental"]["base"] == second.manifest["fingerprint"]
    assert m["incremental"]["duplicates_removed"] == 2
    assert third.stats["records_in"] == 8
    paths = {s["path"].split("/")[1] for s in m["splits"]["train"]["shards"]}
    assert paths >= {first.manifest["fingerprint"], second.manifest["fingerprint"]}
    assert [e["path"] for e in m["doc_hashes"]] == [
        f"../{first.manifest['fingerprint']}/doc_hashes.npy",
        f"../{second.manifest['fingerprint']}/doc_hashes.npy",
        "doc_hashes.npy",
    ]
    documents = sum(s["documents"] for s in m["splits"].values())
    assert sum(e["count"] for e in m["doc_hashes"]) == documents == 32 + 20 + 6
    read_all(DatasetReader(third.uri))


@pytest.mark.parametrize("change", ["modify", "remove", "config", "opt_out"])
def test_anything_but_new_files_is_a_full_rebuild(corpus, tmp_path, change):
    out = tmp_path / "out"
    base = run(corpus, out)
    add_c(corpus)
    kwargs = {}
    if change == "modify":
        (corpus / "a.jsonl").write_text('{"text": "A changed document with a few words."}\n')
    elif change == "remove":
        (corpus / "b.jsonl").unlink()
    elif change == "config":
        kwargs = {"val_fraction": 0.5}
    else:
        kwargs = {"incremental": False}
    full = run(corpus, out, **kwargs)
    assert not full.cache_hit and "incremental" not in full.manifest
    assert full.stats["records_in"] == full.manifest["records_read"]
    assert all(not s["path"].startswith("../") for s in full.manifest["splits"]["train"]["shards"])
    assert full.uri != base.uri


def test_force_rebuilds_in_place_and_never_extends(corpus, tmp_path):
    out = tmp_path / "out"
    base = run(corpus, out)
    shard = Path(base.uri) / base.manifest["splits"]["train"]["shards"][0]["path"]
    os.utime(shard, ns=(0, 0))
    (Path(base.uri) / "train" / "part-00099.parquet").write_bytes(b"stale")
    rebuilt = run(corpus, out, force=True)
    assert not rebuilt.cache_hit and rebuilt.uri == base.uri
    assert shard.stat().st_mtime_ns != 0, "the shard was rewritten"
    assert not (Path(base.uri) / "train" / "part-00099.parquet").exists()
    assert rebuilt.manifest["splits"] == base.manifest["splits"]

    add_c(corpus)
    ext = run(corpus, out)
    assert "incremental" in ext.manifest
    full = run(corpus, out, force=True)
    assert "incremental" not in full.manifest and full.uri not in (ext.uri, base.uri)
    assert full.stats["records_in"] == full.manifest["records_read"] == 32 + 21
    assert run(corpus, out).uri == full.uri, "a full build of the listing wins over extensions"


@pytest.mark.slow
def test_extension_on_s3_reads_base_shards_across_folders(s3_bucket, corpus):
    import s3fs

    fs = s3fs.S3FileSystem()
    for name in ("a.jsonl", "b.jsonl"):
        fs.put_file(str(corpus / name), f"{s3_bucket}/corpus/{name}")
    cfg = tiny_config([f"{s3_bucket}/corpus"])
    base = prepare(cfg, f"{s3_bucket}/out", False, "local")
    add_c(corpus)
    fs.put_file(str(corpus / "c.jsonl"), f"{s3_bucket}/corpus/c.jsonl")
    ext = prepare(cfg, f"{s3_bucket}/out", False, "local")
    assert ext.manifest["incremental"]["base"] == base.manifest["fingerprint"]
    assert ext.stats["records_in"] == 21
    rows = read_all(DatasetReader(ext.uri))
    assert sum(map(len, rows.values())) == sum(s["rows"] for s in ext.manifest["splits"].values())
    own = fs.find(f"{ext.uri}/train")
    shards = ext.manifest["splits"]["train"]["shards"]
    assert len(own) == len(shards) - len(base.manifest["splits"]["train"]["shards"])
    assert prepare(cfg, f"{s3_bucket}/out", False, "local").cache_hit


def test_a_corrupt_reused_shard_is_named_by_the_extension(corpus, tmp_path):
    base = run(corpus, tmp_path)
    add_c(corpus)
    ds = DatasetReader(run(corpus, tmp_path).uri)
    shard = Path(base.uri) / "train" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    ds.read_shard("train", 0)
    with pytest.raises(
        ChecksumError, match=rf"\.\./{base.manifest['fingerprint']}/train/part-00001"
    ):
        ds.read_shard("train", 1)
