"""The efficacy benchmark end to end at a toy size: two budgets, three kinds, JSON and PNG."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "efficacy.py"
WORDS = "the cat sat on a mat while dog ran to big red house and small green tree near old river"


@pytest.mark.slow
def test_efficacy_bench_trains_all_kinds_at_two_budgets_and_marks_repeated_data(tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        text = ". ".join(" ".join(rng.choices(WORDS.split(), k=8)) for _ in range(25))
        (corpus / f"d{i}.txt").write_text(text)
    out = tmp_path / "out" / "efficacy.json"
    cmd = [sys.executable, str(BENCH), "--input", str(corpus), "--tokens", "1536", "--ratio", "3"]
    cmd += ["--budgets", "2", "--seq-len", "32", "--vocab-size", "300", "--micro-batch", "4"]
    cmd += [
        "--eval-batches",
        "2",
        "--threads",
        "1",
        "--val-fraction",
        "0.25",
        "--work",
        str(tmp_path / "w"),
    ]
    subprocess.run([*cmd, "--out", str(out)], check=True, timeout=300, capture_output=True)

    report = json.loads(out.read_text())
    runs = report["runs"]
    assert sorted((r["kind"], r["tokens"]) for r in runs) == sorted(
        (k, t) for k in ("moe", "dense", "upcycled") for t in (512, 1536)
    )
    keys = {"kind", "tokens", "active_params", "total_params", "val_loss", "seed", "tokens_per_s"}
    assert all(keys <= set(r) for r in runs)
    by = {(r["kind"], r["tokens"]): r for r in runs}
    moe, dense, up = by["moe", 1536], by["dense", 1536], by["upcycled", 1536]
    assert abs(dense["active_params"] / moe["active_params"] - 1) < 0.01
    assert dense["total_params"] < moe["total_params"] == up["total_params"]
    # The upcycled arm's dense half is its own run, scored on the same held-out rows.
    assert up["dense_phase"]["tokens"] == 768 and up["dense_phase"]["val_loss"] > 0
    assert up["train_flops"] < moe["train_flops"]
    # The corpus holds fewer than 1536 training tokens: only that budget repeats data.
    train_tokens = report["dataset"]["train_tokens"]
    assert 512 < train_tokens < 1536
    assert [r["repeats_data"] for r in (by["moe", 512], moe)] == [False, True]
    assert {row["tokens"] for row in report["summary"]} == {512, 1536}
    assert set(report["summary"][0]["vs_dense_pct"]) == {"moe", "upcycled"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
