"""The training benchmark runs the trainer's loop at a toy size and reports peak memory
next to tokens/s (and, on CUDA, the logits memory the fused head avoids)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"
TOY = ["--steps", "2", "--warmup", "1", "--repeats", "1", "--corpus-mb", "0.5"]
TOY += ["--micro-batch", "2", "--seq-len", "32"]


def _report(*extra: str) -> dict:
    cmd = [sys.executable, str(BENCH), *TOY, *extra]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


@pytest.mark.slow
def test_train_benchmark_reports_peak_memory_next_to_tokens_per_s():
    plain = _report()["plain"]
    assert plain["measured_steps"] == 2
    assert plain["tokens_per_s"] > 0 and plain["peak_mem_mb"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_benchmark_on_cuda_reports_the_logits_memory_avoided():
    report = _report("--precision", "bf16")
    logits = report["logits_memory"]
    assert logits["micro_batch_peak_mb_fused"] > 0 and report["plain"]["peak_mem_mb"] > 0
    avoided = (
        logits["micro_batch_peak_mb_materialised_logits"] - logits["micro_batch_peak_mb_fused"]
    )
    assert logits["logits_memory_avoided_mb"] == pytest.approx(avoided, abs=0.1)
