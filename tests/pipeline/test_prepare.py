"""prepare() end to end in-process (executor="local"): conservation, quarantine, cache."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pipeline.errors import InputNotFoundError
from pipeline.prepare import prepare
from pipeline.reader import DatasetReader
from tests.pipeline.conftest import document, tiny_config

EXPECTED_REASONS = {
    "invalid_utf8": 1,
    "invalid_json": 1,
    "missing_field": 1,
    "non_string_field": 1,
    "empty": 1,
    "too_short": 1,
    "too_long": 1,
    "repetitive": 1,
    "low_alpha": 1,
    "corrupt_compression": 2,
    "binary_file": 1,
    "unreadable_file": 1,
    "unsupported_format": 1,
}


def corpus_docs_in_order() -> list[str]:
    """The clean_corpus documents in stable (sorted path) order, duplicate included."""
    rng = random.Random(0)
    docs = [document(rng) for _ in range(40)]
    return docs[6:20] + docs[0:6] + docs[20:40] + docs[:1]


def split_stream(ds: DatasetReader, split: str) -> np.ndarray:
    rows = [ds.read_shard(split, i) for i in range(len(ds.shards(split)))]
    return np.concatenate(rows).reshape(-1) if rows else np.empty(0, np.uint16)


def complete_documents(stream: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[a:b].tolist() for a, b in zip(starts, ends, strict=True)]


def test_token_conservation_and_order(clean_corpus, tmp_path):
    result = prepare(tiny_config([str(clean_corpus)]), str(tmp_path / "out"), progress=False,
                     executor="local")  # fmt: skip
    m = result.manifest
    ds = DatasetReader(result.uri)
    tok = ds.load_tokenizer()
    docs = corpus_docs_in_order()
    unique = list(dict.fromkeys(docs))
    encoded = {d: tok.encode(d, add_special_tokens=False).ids for d in unique}
    expected_tokens = sum(len(ids) + 1 for ids in encoded.values())
    got = sum(s["tokens"] + s["remainder_tokens"] for s in m["splits"].values())
    assert got == expected_tokens
    assert m["duplicates_removed"] == 1
    assert sum(s["documents"] for s in m["splits"].values()) == len(unique)
    assert m["splits"]["train"]["documents"] > 0 and m["splits"]["val"]["documents"] > 0
    by_ids = {tuple(v): d for d, v in encoded.items()}
    seen = []
    for split in ("train", "val"):
        stream = split_stream(ds, split)
        assert stream.size == m["splits"][split]["tokens"]
        assert m["splits"][split]["remainder_tokens"] < ds.row_len
        texts = [by_ids[tuple(ids)] for ids in complete_documents(stream, ds.eos_token_id)]
        order = [unique.index(t) for t in texts]
        assert order == sorted(order), f"{split} documents out of corpus order"
        seen += texts
    assert len(seen) >= len(unique) - 2  # at most one document per split is cut by the remainder


def test_every_quarantine_reason_is_recorded(dirty_corpus, tmp_path):
    cfg = tiny_config([str(dirty_corpus)], clean={"min_chars": 10, "max_chars": 2000})
    result = prepare(cfg, str(tmp_path / "out"), progress=False, executor="local")
    q = result.manifest["quarantine"]
    assert q["by_reason"] == EXPECTED_REASONS
    assert q["total"] == sum(EXPECTED_REASONS.values())
    records = [
        json.loads(line)
        for f in q["files"]
        for line in (tmp_path / "out" / "datasets" / "tiny").glob(f"*/{f}").__next__().open()
    ]
    assert len(records) == q["total"]
    mixed = [r for r in records if r["source"].endswith("mixed.jsonl")]
    assert [r["line"] for r in mixed] == [2, 4, 6, 7, 8, 9, 10, 11, 12]
    assert all(r["offset"] is not None for r in mixed)
    assert mixed[0]["reason"] == "invalid_utf8" and mixed[0]["text"].startswith('{"text": "caf')
    # Valid records on both sides of the bad ones are used: 4 in mixed.jsonl, ok.txt, and
    # whatever the truncated gzip held before the cut.
    kept = sum(s["documents"] for s in result.manifest["splits"].values())
    assert kept >= 5 + 1


def test_rerun_is_a_cache_hit(clean_corpus, tmp_path):
    cfg = tiny_config([str(clean_corpus)])
    first = prepare(cfg, str(tmp_path), progress=False, executor="local")
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "datasets").rglob("*")}
    again = prepare(cfg, str(tmp_path), progress=False, executor="local")
    assert not first.cache_hit and again.cache_hit
    assert again.uri == first.uri and again.manifest == first.manifest
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "datasets").rglob("*")} == stamp


def test_fingerprint_tracks_inputs_and_config_not_parallelism(clean_corpus, tmp_path):
    base = prepare(tiny_config([str(clean_corpus)]), str(tmp_path), False, "local")
    same = tiny_config([str(clean_corpus)], num_workers=3, batch_size=2)
    assert prepare(same, str(tmp_path), False, "local").uri == base.uri
    other = prepare(tiny_config([str(clean_corpus)], seq_len=15), str(tmp_path), False, "local")
    assert other.uri != base.uri
    (clean_corpus / "doc00.txt").write_text("A changed document with other words in it.")
    changed = prepare(tiny_config([str(clean_corpus)]), str(tmp_path), False, "local")
    assert changed.uri != base.uri and not changed.cache_hit


def test_max_documents_keeps_the_first_n(clean_corpus, tmp_path):
    result = prepare(tiny_config([str(clean_corpus)], max_documents=7), str(tmp_path), False,
                     "local")  # fmt: skip
    assert sum(s["documents"] for s in result.manifest["splits"].values()) == 7


def test_missing_input_fails_before_any_work(tmp_path):
    with pytest.raises(InputNotFoundError, match="nope"):
        prepare(tiny_config([str(tmp_path / "nope")]), str(tmp_path), False, "local")
    assert not (tmp_path / "datasets").exists()


def test_builtin_python_docs_corpus(tmp_path):
    cfg = tiny_config(["builtin://python-docs"], max_documents=25, vocab_size=512,
                      tokenizer_sample_chars=200_000)  # fmt: skip
    result = prepare(cfg, str(tmp_path), progress=False, executor="local")
    m = result.manifest
    assert sum(s["documents"] for s in m["splits"].values()) == 25
    assert m["sources"][0]["path"].startswith("builtin://python-docs/")
    ds = DatasetReader(result.uri)
    first = ds.load_tokenizer().decode(split_stream(ds, "train")[:40].tolist())
    assert first.startswith(("Module ", "class ", "def ", "async def "))


def test_the_manifest_holds_no_credential(clean_corpus, tmp_path):
    """``data.s3.endpoint_url`` (with userinfo and a signature) and the input URIs are
    written redacted; a rerun is still a cache hit."""
    endpoint = "http://minio:PLANTED1@s3.local:9000/?X-Amz-Signature=PLANTED2"
    cfg = tiny_config([str(clean_corpus)], s3={"endpoint_url": endpoint, "secret": "PLANTED3"})
    result = prepare(cfg, str(tmp_path / "out"), progress=False, executor="local")
    text = (
        (tmp_path / "out" / "datasets" / "tiny" / result.manifest["fingerprint"])
        .joinpath("manifest.json")
        .read_text()
    )
    assert "PLANTED" not in text
    shown = json.loads(text)["config"]["s3"]
    assert shown["endpoint_url"] == "http://***@s3.local:9000/?X-Amz-Signature=***"
    assert prepare(cfg, str(tmp_path / "out"), progress=False, executor="local").cache_hit


def test_a_one_document_corpus_gets_its_val_split_from_the_train_tail(tmp_path):
    rng = random.Random(3)
    book = tmp_path / "book.txt"
    book.write_text(" ".join(document(rng) for _ in range(60)))  # one file = one document
    cfg = tiny_config([str(book)], val_fraction=0.1, shard_rows=32)
    m = prepare(cfg, str(tmp_path / "out"), progress=False, executor="local").manifest
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["documents"] == 1 and val["documents"] == 0
    rows = train["rows"] + val["rows"]
    assert len(train["shards"]) > 2  # shards were written before the tail was taken
    assert val["rows"] == -(-rows // 10) == m["val_split"]["rows_from_train"]
    assert m["val_split"]["method"] == "train_tail"
    ds = DatasetReader(str(tmp_path / "out" / "datasets" / "tiny" / m["fingerprint"]))
    whole = np.concatenate([split_stream(ds, "train"), split_stream(ds, "val")])
    tok = ds.load_tokenizer()
    ids = tok.encode(book.read_text(), add_special_tokens=False).ids + [ds.eos_token_id]
    assert whole.tolist() == ids[: len(whole)]  # val is the end of the book, nothing lost


def test_a_corpus_whose_documents_fill_val_keeps_the_hash_split(clean_corpus, tmp_path):
    m = prepare(tiny_config([str(clean_corpus)]), str(tmp_path / "out"), progress=False,
                executor="local").manifest  # fmt: skip
    assert m["val_split"] == {"method": "document_hash", "rows_from_train": 0}


def test_a_book_longer_than_max_chars_is_cut_at_blank_lines_not_quarantined(tmp_path):
    rng = random.Random(4)
    paragraphs = [document(rng, sentences=2) for _ in range(40)]
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(paragraphs) + "\n")
    cfg = tiny_config([str(book)], clean={"max_chars": 1000})
    assert len(book.read_bytes()) > 5 * 1000
    result = prepare(cfg, str(tmp_path / "out"), progress=False, executor="local")
    m = result.manifest
    assert m["quarantine"]["total"] == 0
    documents = sum(s["documents"] for s in m["splits"].values())
    assert documents >= 5 and m["records_read"] == documents
    ds = DatasetReader(result.uri)
    tok = ds.load_tokenizer()
    pieces = [tok.decode(ids) for split in ("train", "val")
              for ids in complete_documents(split_stream(ds, split), ds.eos_token_id)]  # fmt: skip
    assert all(len(p) <= 1000 for p in pieces)
    joined = " ".join(p.replace("\n\n", " ") for p in pieces).split()
    assert set(joined) <= set(" ".join(paragraphs).split())  # pieces of the book, nothing else
