"""Near-duplicate removal: MinHash signatures on workers, the LSH decision in stable order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from jobs.settings import ConfigError, load_root_config
from pipeline.clean import content_hash, normalize
from pipeline.config import NearDupConfig
from pipeline.minhash_stage import signatures
from pipeline.near_dedup import NearDeduper
from pipeline.prepare import prepare
from tests.pipeline.conftest import document, tiny_config, write_jsonl

NEAR = {"threshold": 0.8}


def changed(text: str, positions: list[int], word: str = "zebra") -> str:
    words = text.split(" ")
    for p in positions:
        words[p] = word
    return " ".join(words)


def similarity(a: str, b: str, cfg: NearDupConfig) -> float:
    sig = signatures([a, b], cfg)
    return float(np.mean(sig[0] == sig[1]))


def test_signatures_estimate_jaccard_of_word_shingles():
    cfg = NearDupConfig(**NEAR)
    rng = random.Random(3)
    long_doc = document(rng, sentences=16)
    assert similarity(long_doc, changed(long_doc, [50]), cfg) >= 0.85
    assert similarity(long_doc, document(rng, sentences=16), cfg) < 0.2
    assert similarity(long_doc, long_doc.upper(), cfg) == 1.0, "shingles are lower-cased"


def test_the_earliest_similar_kept_document_is_the_match():
    cfg = NearDupConfig(**NEAR)
    rng = random.Random(4)
    a, b = document(rng, 16), document(rng, 16)
    a2, a3 = changed(a, [10]), changed(a, [100])
    sig = signatures([a, b, a2, a3], cfg)
    index = NearDeduper(cfg)
    assert index.check(sig[0], 11, "f", 1) is None
    assert index.check(sig[1], 22, "f", 2) is None
    first = index.check(sig[2], 33, "f", 3)
    assert (first.hash, first.line) == (11, 1)
    assert index.check(sig[3], 44, "f", 4).hash == 11, "a quarantined copy is not indexed"
    assert index.removed == 2


@pytest.fixture
def near_corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """Ten distinct long documents, two near copies of the first two, one exact copy."""
    rng = random.Random(7)
    docs = [document(rng, sentences=16) for _ in range(10)]
    near_a = changed(docs[0], [40])  # one word
    near_b = changed(docs[1], [20, 90, 150], "quartz")  # a few words
    root = tmp_path / "corpus"
    root.mkdir()
    write_jsonl(root / "a.jsonl", [{"text": t} for t in docs[:5] + [near_a]])
    write_jsonl(root / "b.jsonl", [{"text": t} for t in [docs[2], *docs[5:], near_b]])
    return root, docs


def quarantined(uri: str, manifest: dict) -> list[dict]:
    lines = []
    for rel in manifest["quarantine"]["files"]:
        lines += (Path(uri) / rel).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_prepare_quarantines_near_duplicates_with_their_match(near_corpus, tmp_path):
    corpus, docs = near_corpus
    cfg = tiny_config([str(corpus)], near_dup=NEAR, val_fraction=0.0)
    result = prepare(cfg, str(tmp_path / "out"), progress=False, executor="local")
    m = result.manifest
    assert m["splits"]["train"]["documents"] == 10, "every distinct document is kept"
    assert m["duplicates_removed"] == 1
    assert m["near_duplicates"]["removed"] == 2
    assert m["near_duplicates"]["threshold"] == 0.8
    assert m["quarantine"]["by_reason"] == {"near_duplicate": 2}
    records = quarantined(result.uri, m)
    assert [(Path(r["source"]).name, r["line"]) for r in records] == [
        ("a.jsonl", 6),
        ("b.jsonl", 7),
    ]
    assert [(Path(r["matched_source"]).name, r["matched_line"]) for r in records] == [
        ("a.jsonl", 1),
        ("a.jsonl", 2),
    ]
    kept = [content_hash(normalize(d)) for d in docs[:2]]
    assert [r["matched_hash"] for r in records] == kept
    assert all(r["reason"] == "near_duplicate" and r["similarity"] >= 0.8 for r in records)


def test_threshold_off_keeps_near_duplicates(near_corpus, tmp_path):
    corpus, _ = near_corpus
    cfg = tiny_config([str(corpus)], val_fraction=0.0)
    m = prepare(cfg, str(tmp_path / "out"), progress=False, executor="local").manifest
    assert m["splits"]["train"]["documents"] == 12
    assert m["near_duplicates"] is None
    assert "near_duplicate" not in m["quarantine"]["by_reason"]


def test_same_kept_set_and_bytes_across_runs_and_batching(near_corpus, tmp_path):
    corpus, _ = near_corpus
    runs = [
        prepare(
            tiny_config([str(corpus)], near_dup=NEAR, batch_size=b),
            str(tmp_path / f"b{b}"),
            progress=False,
            executor="local",
        )
        for b in (1, 4, 4)
    ]
    shards = [[s["sha256"] for s in r.manifest["splits"]["train"]["shards"]] for r in runs]
    assert shards[0] == shards[1] == shards[2]
    assert len({json.dumps(quarantined(r.uri, r.manifest)) for r in runs}) == 1


def test_off_leaves_the_fingerprint_of_older_datasets_alone(tmp_path):
    cfg = tiny_config([str(tmp_path)])
    assert "near_dup" not in cfg.fingerprint_view()
    on = tiny_config([str(tmp_path)], near_dup=NEAR)
    assert on.fingerprint_view()["near_dup"] == {"threshold": 0.8, "ngram": 5, "num_perm": 128}


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.near_dup.threshold=1.5", "data.near_dup.threshold"),
        ("data.near_dup.ngram=0", "data.near_dup.ngram"),
        ("data.near_dup.shingle=3", "data.near_dup.shingle"),
    ],
)
def test_bad_near_dup_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_root_config(None, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_same_output_on_ray_at_two_workers_as_in_process(ray_local, near_corpus, tmp_path):
    corpus, _ = near_corpus
    results = [
        prepare(tiny_config([str(corpus)], near_dup=NEAR, num_workers=2), str(tmp_path / "r")),
        prepare(tiny_config([str(corpus)], near_dup=NEAR), str(tmp_path / "l"), False, "local"),
    ]
    ray_m, local_m = (r.manifest for r in results)
    assert ray_m["near_duplicates"] == local_m["near_duplicates"]
    assert ray_m["splits"]["train"]["shards"] == local_m["splits"]["train"]["shards"]
    assert quarantined(results[0].uri, ray_m) == quarantined(results[1].uri, local_m)
