"""Hostile input through ``prepare``: deep JSON, big arrays, bombs, bad tokenizers.

Each case must be quarantined with a reason while every valid record around
it is kept, or refused with a one-line error before any folder is created.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipeline.prepare import prepare
from pipeline.reader import DatasetReader
from tests.pipeline.conftest import document, tiny_config, write_jsonl

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
