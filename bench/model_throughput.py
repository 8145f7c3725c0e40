"""Training-step throughput and peak memory: moe_model vs transformers' MixtralForCausalLM.

Both sides get the same config, the same weights (ours built from a seed, copied into HF),
the same token batch and device; a step is forward (with labels, router aux loss on),
backward and AdamW. HF runs each of its experts implementations; the fastest is the
reference. Step times are taken interleaved (ours, hf_a, hf_b, ours, ...) in this process
so a shared, noisy machine slows every side alike. Peak memory: on CUDA
`torch.cuda.max_memory_allocated`, on CPU the peak RSS growth of a fresh subprocess per
side (VmHWM after the run minus VmRSS after imports). MFU uses a matmul peak measured in
this run and `ModelConfig.flops_per_token`.

    python bench/model_throughput.py                          # CPU, fp32, tiny, 8 x 256
    python bench/model_throughput.py --device cuda            # bf16, ~1B-active, 4 x 2048

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_model import ModelConfig, MoETransformer  # noqa: E402
from moe_model.hf import hf_config  # noqa: E402

# ~1B active / ~3.1B total; head_dim 128 as in Mixtral. Used by default with --device cuda.
GPU_CONFIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=4096,
    num_layers=14,
    num_heads=16,
    num_kv_heads=4,
    num_experts=8,
    top_k=2,
    max_seq_len=4096,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# AdamW implementations; the trainer (`jobs.train.optim`) uses fused.
OPTIMIZERS = {
    "fused": dict(fused=True),
    "foreach": dict(foreach=True),
    "single": dict(foreach=False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype", choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA"
    )
    p.add_argument(
        "--preset", help="model preset (default: tiny on CPU, a ~1B-active shape on CUDA)"
    )
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides")
    p.add_argument("--batch", type=int, help="default: 8 on CPU, 4 on CUDA")
    p.add_argument("--seq", type=int, help="default: 256 on CPU, 2048 on CUDA")
    p.add_argument("--steps", type=int, default=6, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--hf-impls",
        help="comma-separated HF experts implementations "
        "(default: eager,grouped_mm on CPU; eager,batched_mm,grouped_mm on CUDA)",
    )
    p.add_argument("--ours-backend", default="auto", choices=["auto", "loop", "grouped_mm"])
    p.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    p.add_argument(
        "--optimizer",
        default="fused",
        choices=list(OPTIMIZERS),
        help="AdamW implementation for both sides (the trainer uses fused)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch = args.batch or (4 if cuda else 8)
    args.seq = args.seq or (2048 if cuda else 256)
    default_impls = "eager,batched_mm,grouped_mm" if cuda else "eager,grouped_mm"
    args.hf_impls = [s for s in (args.hf_impls or default_impls).split(",") if s]
    return args


def build_config(args: argparse.Namespace) -> ModelConfig:
    overrides = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        overrides[key] = json.loads(raw) if raw not in ("None", "none") else None
    if args.preset:
        return ModelConfig.preset(args.preset, **overrides)
    if args.device == "cuda":
        return ModelConfig(**{**GPU_CONFIG, **overrides})
    return ModelConfig.preset("tiny", **overrides)


def build_ours(cfg: ModelConfig, args: argparse.Namespace) -> MoETransformer:
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = MoETransformer(cfg)
    model.set_experts_backend(args.ours_backend)
    return model.to(DTYPES[args.dtype]).train()


def hf_state_from_ours(model: MoETransformer) -> dict[str, torch.Tensor]:
    """Our weights under the names transformers 5 holds in memory (experts fused per layer)."""
    renames = {
        "embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    per_layer = {
        "attn.q_proj.weight": "self_attn.q_proj.weight",
        "attn.k_proj.weight": "self_attn.k_proj.weight",
        "attn.v_proj.weight": "self_attn.v_proj.weight",
        "attn.o_proj.weight": "self_attn.o_proj.weight",
        "attn_norm.weight": "input_layernorm.weight",
        "moe_norm.weight": "post_attention_layernorm.weight",
        "moe.router.weight": "mlp.gate.weight",
        "moe.w13": "mlp.experts.gate_up_proj",
        "moe.w2": "mlp.experts.down_proj",
    }
    out = {}
    for key, value in model.state_dict().items():
        if key in renames:
            out[renames[key]] = value
        elif key.startswith("layers.") and key.split(".", 2)[2] in per_layer:
            _, i, rest = key.split(".", 2)
            out[f"model.layers.{i}.{per_layer[rest]}"] = value
    return out


def build_hf(cfg: ModelConfig, impl: str, args: argparse.Namespace):
    import transformers

    # The same config.json mapping `save_hf` writes (held to HF by tests/moe_model/test_hf.py).
    hf_cfg = transformers.MixtralConfig(
        **{
            **hf_config(cfg),
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "output_router_logits": True,
            "use_cache": False,
        }
    )
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(args.device):
        hf = transformers.MixtralForCausalLM(hf_cfg).to(DTYPES[args.dtype])
    hf.set_experts_implementation(impl)
    ours = build_ours(cfg, args)
    missing, unexpected = hf.load_state_dict(hf_state_from_ours(ours), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    del ours
    return hf.train()


def make_step(model, ids: torch.Tensor, optimizer: str = "fused") -> Callable[[], torch.Tensor]:
    """One training step; AdamW as `jobs.train.optim` builds it (fused) unless told otherwise."""
    kwargs = OPTIMIZERS[optimizer]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **kwargs)

    def step() -> float:
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps: dict[str, Callable], args: argparse.Namespace) -> dict[str, dict]:
    first_loss = {name: float(fn()) for name, fn in steps.items()}
    for _ in range(args.warmup - 1):
        for fn in steps.values():
            fn()
    sync(args.device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    return {
        name: {"first_loss": first_loss[name], "step_s": [round(t, 4) for t in ts]}
        for name, ts in times.items()
    }


def matmul_peak_flops(device: str, dtype: torch.dtype) -> float:
    """Best of several square GEMMs: the ceiling MFU is reported against."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(10):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process image. Not ru_maxrss: Linux carries that
    across fork + exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_worker(args: argparse.Namespace) -> None:
    """Fresh process: build one side, run warmup + 2 steps, report peak RSS growth."""
    if args.worker.startswith("hf_"):
        import transformers  # noqa: F401  (its import cost belongs to the baseline)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(args)
    ids = make_batch(cfg, args)
    baseline = rss_bytes("VmRSS")
    if args.worker == "ours":
        step = make_step(build_ours(cfg, args), ids, args.optimizer)
    else:
        step = make_step(build_hf(cfg, args.worker.removeprefix("hf_"), args), ids, args.optimizer)
    for _ in range(3):
        step()
    peak = rss_bytes("VmHWM")
    print(json.dumps({"peak_mem_mb": round((peak - baseline) / 2**20, 1)}))


def cpu_peak_memory(side: str, argv: list[str]) -> float:
    cmd = [sys.executable, __file__, *argv, "--worker", side]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mem_mb"]


def make_batch(cfg: ModelConfig, args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(args.device)


def summarize(name: str, record: dict, tokens: int, flops_per_token: float, peak: float) -> dict:
    ts = record["step_s"]
    median = statistics.median(ts)
    tokens_per_s = tokens / median
    return {
        **record,
        "step_s_median": round(median, 4),
        "step_s_min": round(min(ts), 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_best": round(tokens / min(ts), 1),
        "mfu": round(tokens_per_s * flops_per_token / peak, 4),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    cfg = build_config(args)
    dtype = DTYPES[args.dtype]
    ids = make_batch(cfg, args)
    tokens = args.batch * args.seq
    peak = matmul_peak_flops(args.device, dtype)
    sides = ["ours"] + [f"hf_{impl}" for impl in args.hf_impls]
    results: dict[str, dict] = {}
    memory: dict[str, float] = {}
    if args.device == "cuda":
        for side in sides:
            results.update(_measure_cuda_side(side, cfg, ids, args))
            memory[side] = results[side].pop("peak_mem_mb")
    else:
        steps = {"ours": make_step(build_ours(cfg, args), ids, args.optimizer)}
        for impl in args.hf_impls:
            steps[f"hf_{impl}"] = make_step(build_hf(cfg, impl, args), ids, args.optimizer)
        results = time_interleaved(steps, args)
        del steps
        if not args.no_memory:
            memory = {side: cpu_peak_memory(side, argv) for side in sides}
    # Measured again after the runs: on a shared machine the best of both is the honest ceiling.
    peak = max(peak, matmul_peak_flops(args.device, dtype))
    fpt = cfg.flops_per_token(args.seq)
    for side in sides:
        results[side] = summarize(side, results[side], tokens, fpt, peak)
        if side in memory:
            results[side]["peak_mem_mb"] = memory[side]
    hf_best = max(sides[1:], key=lambda s: results[s]["tokens_per_s"]) if sides[1:] else None
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "ours_backend": args.ours_backend,
        "optimizer": f"AdamW ({args.optimizer})",
        "config": cfg.to_dict(),
        "params": cfg.num_params(),
        "active_params": cfg.num_active_params(),
        "flops_per_token": fpt,
        "matmul_peak_tflops": round(peak / 1e12, 3),
        "results": results,
        "hf_best": hf_best,
    }
    if hf_best:
        ours, best = results["ours"], results[hf_best]
        report["speedup_vs_hf_best"] = round(ours["tokens_per_s"] / best["tokens_per_s"], 3)
        report["speedup_vs_hf_best_min_step"] = round(best["step_s_min"] / ours["step_s_min"], 3)
        # Steps are interleaved, so round i of each side saw the same machine state: the
        # median of per-round ratios is robust to a shared machine's drift between rounds.
        paired = [b / a for a, b in zip(ours["step_s"], best["step_s"], strict=True)]
        report["speedup_vs_hf_best_paired_median"] = round(statistics.median(paired), 3)
        if "peak_mem_mb" in ours and "peak_mem_mb" in best:
            report["memory_ratio_vs_hf_best"] = round(ours["peak_mem_mb"] / best["peak_mem_mb"], 3)
    print(json.dumps(report, indent=2))


def _measure_cuda_side(side: str, cfg: ModelConfig, ids: torch.Tensor, args) -> dict[str, dict]:
    """One side at a time on the GPU, freed before the next, so peaks do not mix."""
    model = build_ours(cfg, args) if side == "ours" else build_hf(cfg, side[3:], args)
    step = make_step(model, ids, args.optimizer)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    record = time_interleaved({side: step}, args)
    record[side]["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del model, step
    torch.cuda.empty_cache()
    return record


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
