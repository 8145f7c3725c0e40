"""Two prepares of the same dataset at once, in two processes: without a lock each one's
tidy step deletes the other's files. With it the second waits and is a cache hit."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from pipeline.reader import DatasetReader
from pipeline.storage import list_files

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, sys
from pipeline.config import PrepareConfig
from pipeline.prepare import prepare
cfg = PrepareConfig(name="race", inputs=[sys.argv[1]], seq_len=64, vocab_size=400, shard_rows=16)
result = prepare(cfg, sys.argv[2], progress=False, executor="local")
print(json.dumps({"uri": result.uri, "cache_hit": result.cache_hit}))
"""
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
]


def test_two_prepares_of_one_dataset_run_one_after_the_other(tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        text = ". ".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(150))
        (corpus / f"doc{i:03d}.txt").write_text(text)
    root = tmp_path / "root"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(corpus), str(root)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0]["uri"] == results[1]["uri"]
    assert sorted(r["cache_hit"] for r in results) == [False, True]

    reader = DatasetReader(results[0]["uri"])
    for split in reader.splits:
        for i in range(len(reader.shards(split))):
            reader.read_shard(split, i)  # present, sha256 verified
    listed = {s["path"] for split in reader.splits for s in reader.shards(split)}
    present = set(list_files(reader.uri))
    assert listed <= present
    assert not [p for p in present if ".tmp" in p], present
