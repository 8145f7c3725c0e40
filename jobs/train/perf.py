"""Throughput accounting: tokens/s, model FLOPs utilisation (MFU) and data-wait fraction.

MFU = achieved model FLOP/s / peak FLOP/s (PaLM, Chowdhery et al. 2022, app. B),
with FLOPs per token from ``ModelConfig.flops_per_token`` (active parameters
only: an MoE token pays for top_k experts, not all of them).
"""

from __future__ import annotations

import functools
import time

import torch

# Dense peak FLOP/s per device (no sparsity), from the vendors' datasheets:
# (bf16, fp32). H100/H200 SXM: 989 TF bf16, 67 TF fp32; A100: 312 / 19.5.
GPU_PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "A10": (125e12, 31.2e12),
}


@functools.lru_cache(maxsize=4)
def measured_matmul_peak(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a large square matmul on this device: the CPU's practical peak."""
    n = 512 if device_type == "cpu" else 8192
    a = torch.randn(n, n, device=device_type, dtype=dtype)
    b = torch.randn(n, n, device=device_type, dtype=dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        a @ b
        reps += 1
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_flops(device: torch.device, bf16: bool) -> float:
    """Per-device peak: the datasheet for known GPUs, else a measured matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (peak_bf16, peak_fp32) in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak_bf16 if bf16 else peak_fp32
        return measured_matmul_peak("cuda", torch.bfloat16 if bf16 else torch.float32)
    return measured_matmul_peak("cpu", torch.float32)


class Meter:
    """Accumulates step times, data waits and tokens between two log points."""

    def __init__(self, flops_per_token: float, peak_per_device: float, world_size: int) -> None:
        self.flops_per_token = flops_per_token
        self.peak = peak_per_device * world_size
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.tokens = 0
        self.step_time = 0.0
        self.data_wait = 0.0

    def add(self, tokens: int, step_time: float, data_wait: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.step_time += step_time
        self.data_wait += data_wait

    def metrics(self) -> dict[str, float]:
        if self.steps == 0 or self.step_time <= 0:
            return {}
        tokens_per_s = self.tokens / self.step_time
        return {
            "perf/tokens_per_s": tokens_per_s,
            "perf/mfu": tokens_per_s * self.flops_per_token / self.peak,
            "perf/step_time_s": self.step_time / self.steps,
            "perf/data_wait_frac": self.data_wait / self.step_time,
        }
