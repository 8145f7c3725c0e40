"""The model benchmark runs end to end at a toy size and reports what the README quotes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "model_throughput.py"


@pytest.mark.slow
def test_model_benchmark_prints_both_sides_and_the_ratios():
    cmd = [sys.executable, str(BENCH), "--preset", "debug", "--batch", "2", "--seq", "32"]
    cmd += ["--steps", "2", "--warmup", "1", "--no-memory", "--hf-impls", "eager"]
    cmd += ["--set", "aux_loss_coef=0.0", "z_loss_coef=0.0"]  # HF's aux-loss convention differs
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    report = json.loads(out)
    debug = report["configs"]["debug"]
    assert set(debug["results"]) == {"ours", "hf_eager"}
    # Same weights and rows on both sides, router losses off: ours is the trainer's step on
    # aligned targets, HF's loss gets the same targets: the same cross-entropy.
    ours, hf = debug["results"]["ours"], debug["results"]["hf_eager"]
    assert ours["first_loss"] == pytest.approx(hf["first_loss"], abs=1e-4)
    assert len(ours["step_s"]) == len(hf["step_s"]) == 2
    for key in ("speedup_vs_hf_best", "speedup_vs_hf_best_paired_median"):
        assert debug[key] > 0 and report[f"geomean_{key}"] == debug[key]
    assert report["matmul_peak_tflops"] > 0
    assert report["ours"].startswith("jobs.train.step.train_step")
    assert report["optimizer"].startswith("AdamW (fused)")
