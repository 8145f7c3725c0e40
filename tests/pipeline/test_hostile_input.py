"""Hostile input through ``prepare``: deep JSON, big arrays, bombs, bad tokenizers.

Each case must be quarantined with a reason while every valid record around
it is kept, or refused with a one-line error before any folder is created.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.prepare import prepare
from pipeline.reader import DatasetReader
from tests.pipeline.conftest import document, tiny_config, write_jsonl

REPO = Path(__file__).resolve().parents[2]
BOMB_BYTES = 1536 << 20
# Runs prepare in a fresh process and reports what it kept and its own peak RSS (KiB).
PREPARE_AND_MEASURE = """
import json, resource, sys
from pipeline.prepare import prepare
from tests.pipeline.conftest import tiny_config
cfg = tiny_config([sys.argv[1]], max_file_bytes=int(sys.argv[3]))
m = prepare(cfg, sys.argv[2], progress=False, executor="local").manifest
docs = sum(s["documents"] for s in m["splits"].values())
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"docs": docs, "reasons": m["quarantine"]["by_reason"], "rss_kib": rss}))
"""
DEEP_LIST = b'{"text": ' + b"[" * 1000 + b"]" * 1000 + b"}"
DEEP_DICT = b"[" * 1000 + b'{"text": "x"}' + b"]" * 1000


def quarantined(result, root: Path) -> list[dict]:
    folder = Path(result.uri)
    return [
        json.loads(line)
        for rel in result.manifest["quarantine"]["files"]
        for line in (folder / rel).open()
    ]


def documents(result) -> int:
    return sum(s["documents"] for s in result.manifest["splits"].values())


def test_deep_json_is_quarantined_and_later_lines_kept(tmp_path):
    rng = random.Random(3)
    good = [{"text": document(rng)} for _ in range(6)]
    root = tmp_path / "corpus"
    root.mkdir()
    write_jsonl(root / "a.jsonl", [good[0], DEEP_LIST, good[1], DEEP_DICT, good[2]])
    arr = b"[" + b",".join([json.dumps(good[3]).encode(), DEEP_LIST, DEEP_DICT]) + b","
    (root / "b.json").write_bytes(arr + json.dumps(good[4:]).encode()[1:])
    result = prepare(tiny_config([str(root)]), str(tmp_path / "out"), False, "local")
    assert documents(result) == 6
    bad = quarantined(result, tmp_path / "out")
    assert [(r["reason"], r["line"]) for r in bad] == [
        ("invalid_json", 2),
        ("invalid_json", 4),
        ("invalid_json", 2),
        ("invalid_json", 3),
    ]
    assert all("nested 100" in r["detail"] for r in bad), bad


def test_json_array_is_streamed_element_by_element(tmp_path):
    rng = random.Random(4)
    docs = [document(rng) for _ in range(30)]
    items = (
        [{"text": d} for d in docs[:10]] + [{"text": "x" * 3000}] + [{"text": d} for d in docs[10:]]
    )
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "big.json").write_text(json.dumps(items, indent=1))
    (root / "cut.json").write_text(json.dumps([{"text": d} for d in docs[:3]])[:-30])
    cfg = tiny_config([str(root)], clean={"max_chars": 500})
    result = prepare(cfg, str(tmp_path / "out"), False, "local")
    # cut.json's first two elements are whole; the third is cut off with the array's end.
    assert documents(result) == 30
    bad = quarantined(result, tmp_path / "out")
    assert [(r["reason"], r["source"].rsplit("/", 1)[-1], r["line"]) for r in bad] == [
        ("too_long", "big.json", 11),
        ("invalid_json", "cut.json", 3),
    ]
    assert bad[0]["offset"] > 0 and "ends inside the JSON array" in bad[1]["detail"]
    ds = DatasetReader(result.uri)
    assert ds.manifest["records_read"] == len(items) + 3


def test_heldout_eval_files_skip_deep_json(tmp_path):
    from jobs.service.config import EvaluateConfig
    from jobs.service.evaluate import heldout_set
    from pipeline.config import SpecialTokens
    from pipeline.tokenizer import train_bpe

    rng = random.Random(5)
    good = [{"text": document(rng)} for _ in range(4)]
    path = write_jsonl(tmp_path / "heldout.jsonl", [good[0], DEEP_LIST, DEEP_DICT, *good[1:]])
    tok = train_bpe((g["text"] for g in good), 300, SpecialTokens())
    data = tiny_config([str(path)], seq_len=7)
    rows = heldout_set([str(path)], data, tok, 2, EvaluateConfig(batch_size=1, max_batches=1000))
    want = sum(len(tok.encode(g["text"]).ids) + 1 for g in good) // 8
    assert rows is not None and rows.rows.shape == (want, 8)


def write_bombs(folder: Path) -> None:
    """1.5 GB of one JSON line that never ends, gzip (~7 MB) and zstd (~50 KB) compressed."""
    block = b"a" * (1 << 20)
    with gzip.open(folder / "bomb.jsonl.gz", "wb", compresslevel=1) as g:
        g.write(b'{"text": "')
        for _ in range(BOMB_BYTES // len(block)):
            g.write(block)
    with (
        open(folder / "bomb.jsonl.zst", "wb") as f,
        zstandard.ZstdCompressor().stream_writer(f) as z,
    ):
        z.write(b'{"text": "')
        for _ in range(BOMB_BYTES // len(block)):
            z.write(block)


def run_measured(corpus: Path, out: Path, max_file_bytes: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PREPARE_AND_MEASURE, str(corpus), str(out), str(max_file_bytes)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_decompression_bombs_are_too_large_and_memory_stays_flat(tmp_path):
    rng = random.Random(6)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "good.jsonl", [{"text": document(rng)} for _ in range(20)])
    limit = 1 << 30
    base = run_measured(corpus, tmp_path / "base", limit)
    write_bombs(corpus)
    bombed = run_measured(corpus, tmp_path / "bombed", limit)
    assert bombed["docs"] == base["docs"] == 20
    assert bombed["reasons"] == {"too_large": 2}
    assert bombed["rss_kib"] - base["rss_kib"] < 1 << 20, (base, bombed)


def test_parquet_past_max_file_bytes_keeps_the_row_groups_before(tmp_path):
    rng = random.Random(7)
    docs = [document(rng) for _ in range(20)]
    root = tmp_path / "corpus"
    root.mkdir()
    table = pa.table({"text": docs + ["z" * 400_000] * 4})
    pq.write_table(table, root / "rows.parquet", row_group_size=10, compression="zstd")
    spooled = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": ["z" * 400_000] * 4}), spooled, compression="none")
    (root / "more.parquet.gz").write_bytes(gzip.compress(spooled.getvalue().to_pybytes()))
    cfg = tiny_config([str(root)], max_file_bytes=200_000)
    result = prepare(cfg, str(tmp_path / "out"), False, "local")
    assert documents(result) == 20
    bad = quarantined(result, tmp_path / "out")
    assert [(r["reason"], r["source"].rsplit("/", 1)[-1], r["line"]) for r in bad] == [
        ("too_large", "more.parquet.gz", None),
        ("too_large", "rows.parquet", 21),
    ]


def test_tokenizer_with_an_id_past_vocab_size_is_refused_before_any_folder(tmp_path):
    from tokenizers import Tokenizer, models

    from pipeline.errors import PipelineError

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "a": 3, "b": 70000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("a b a b")
    cfg = tiny_config([str(tmp_path / "a.txt")], tokenizer=str(tmp_path), vocab_size=65535)
    with pytest.raises(PipelineError, match=r"^data.vocab_size: .* token id 70000, .*uint16"):
        prepare(cfg, str(tmp_path / "out"), False, "local")
    assert not (tmp_path / "out").exists()
