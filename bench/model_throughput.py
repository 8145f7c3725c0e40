"""Training-step throughput and peak memory: the trainer's step vs transformers' Mixtral.

Ours is the trainer's own step, `jobs.train.step.train_step` (what `jobs/train/loop.py`
calls): forward with aligned targets through the fused LM head + cross-entropy, backward,
gradient clipping, fused AdamW from `jobs.train.optim.build_optimizer`, router-bias update.
HF's step: `MixtralForCausalLM` forward on the same inputs and targets (router aux loss on),
backward, the same clipping and the same optimizer builder. Both sides get the same config,
the same weights (ours built from a seed, copied into HF), the same rows of seq + 1 tokens,
the same device. HF runs each of its experts implementations; the fastest is the reference.

Several configs (the CPU default: `tiny`; one with other head count, GQA ratio and vocab;
one with 16 experts top-1), none tuned for: the report gives the ratio per config and their
geometric mean. Step times are interleaved (ours, hf_a, hf_b, ours, ...) in this process so
a shared, noisy machine slows every side alike. Peak memory: on CUDA
`torch.cuda.max_memory_allocated`, on CPU the peak RSS growth of a fresh subprocess per
side (VmHWM after the run minus VmRSS after imports). MFU uses a matmul peak measured in
this run and `ModelConfig.flops_per_token`.

    python bench/model_throughput.py                          # CPU, fp32, 3 configs, 8 x 256
    python bench/model_throughput.py --configs tiny           # one of CONFIGS
    python bench/model_throughput.py --preset debug --set top_k=1   # one custom config
    python bench/model_throughput.py --device cuda            # bf16, ~1B-active, 4 x 2048

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.train.config import TrainConfig  # noqa: E402
from jobs.train.optim import build_optimizer  # noqa: E402
from jobs.train.step import Trainee, train_step  # noqa: E402
from moe_model import ModelConfig, MoETransformer  # noqa: E402
from moe_model.cpu import scratch  # noqa: E402
from moe_model.hf import LAYER_RENAMES, hf_config  # noqa: E402

# The CPU configs: presets plus overrides. Each varies what a CPU trick could be fitted to:
# head count and head dim, GQA ratio, vocab (and untied head), experts and top-k.
CONFIGS: dict[str, dict] = {
    "tiny": dict(preset="tiny"),
    "d288-h6kv2-v4096": dict(
        preset="tiny",
        hidden_size=288,
        intermediate_size=576,
        num_heads=6,
        num_kv_heads=2,
        vocab_size=4096,
        tie_embeddings=False,
    ),
    "e16-top1": dict(preset="tiny", num_experts=16, top_k=1),
}
# ~1B active / ~3.1B total; head_dim 128 as in Mixtral. The default with --device cuda.
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
OPTIMIZERS = {"fused": True, "foreach": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype", choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA"
    )
    p.add_argument(
        "--configs",
        help=f"comma-separated names from {sorted(CONFIGS)} (default: all on CPU)",
    )
    p.add_argument("--preset", help="one custom config: this preset (with --set overrides)")
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


def build_configs(args: argparse.Namespace) -> dict[str, ModelConfig]:
    """Named configs to run: a custom one (--preset/--set), --configs, or the device default."""
    overrides = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        overrides[key] = json.loads(raw) if raw not in ("None", "none") else None
    if args.preset or (overrides and not args.configs):
        base = ModelConfig.preset(args.preset or "tiny", **overrides)
        return {args.preset or "custom": base}
    if args.configs:
        names = [n for n in args.configs.split(",") if n]
    elif args.device == "cuda":
        return {"gpu-1b-active": ModelConfig(**{**GPU_CONFIG, **overrides})}
    else:
        names = list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown[0]!r}, expected one of {sorted(CONFIGS)}")
    out = {}
    for name in names:
        fields = dict(CONFIGS[name])
        out[name] = ModelConfig.preset(fields.pop("preset"), **{**fields, **overrides})
    return out


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
    # The checkpoint's names (hf.LAYER_RENAMES), where transformers 5 calls the MoE block mlp.
    per_layer = {
        **{
            ours: theirs.replace("block_sparse_moe.", "mlp.")
            for ours, theirs in LAYER_RENAMES.items()
        },
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
    tied = cfg.tie_embeddings and all(k == "lm_head.weight" for k in missing)
    assert not unexpected and (tied or not missing), (missing, unexpected)
    del ours
    return hf.train()


def ours_step(model: MoETransformer, rows: torch.Tensor, args) -> Callable[[], float]:
    """The trainer's step itself: `train_step` on a `Trainee` as `jobs.train.loop` builds it."""
    tc = TrainConfig()
    opt = build_optimizer(model, tc, fused=OPTIMIZERS[args.optimizer])
    tr = Trainee(model, model, opt, torch.device(args.device), bf16=args.dtype == "bfloat16")

    def step() -> float:
        return train_step(tr, [rows], tc.lr, tc.grad_clip, poison=False).loss

    return step


def hf_step(model, rows: torch.Tensor, args) -> Callable[[], float]:
    """HF's training step with the same targets, clipping and optimizer builder."""
    tc = TrainConfig()
    opt = build_optimizer(model, tc, fused=OPTIMIZERS[args.optimizer])
    inputs, targets = rows[:, :-1], rows[:, 1:].contiguous()
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        # `shift_labels` given: HF's loss takes the targets as aligned, as ours does.
        out = model(input_ids=inputs, labels=targets, shift_labels=targets)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    return step


def make_step(side: str, cfg: ModelConfig, rows: torch.Tensor, args) -> Callable[[], float]:
    if side == "ours":
        return ours_step(build_ours(cfg, args), rows, args)
    return hf_step(build_hf(cfg, side.removeprefix("hf_"), args), rows, args)


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
    """Fresh process: build one side of one config, run 3 steps, report peak RSS growth."""
    name, side = args.worker.split(":", 1)
    if side.startswith("hf_"):
        import transformers  # noqa: F401  (its import cost belongs to the baseline)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_configs(args)[name]
    rows = make_rows(cfg, args)
    baseline = rss_bytes("VmRSS")
    step = make_step(side, cfg, rows, args)
    with scratch.scope():  # as the trainer runs: one pool for the whole run
        for _ in range(3):
            step()
    peak = rss_bytes("VmHWM")
    print(json.dumps({"peak_mem_mb": round((peak - baseline) / 2**20, 1)}))


def cpu_peak_memory(name: str, side: str, argv: list[str]) -> float:
    cmd = [sys.executable, __file__, *argv, "--worker", f"{name}:{side}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mem_mb"]


def make_rows(cfg: ModelConfig, args: argparse.Namespace) -> torch.Tensor:
    """Rows of seq + 1 tokens, as the dataset's shards hold them."""
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, args.seq + 1)
    return torch.randint(0, cfg.vocab_size, shape, generator=g).to(args.device)


def summarize(record: dict, tokens: int, flops_per_token: float, peak: float) -> dict:
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


def measure_config(name: str, cfg: ModelConfig, args, argv: list[str]) -> dict:
    rows = make_rows(cfg, args)
    sides = ["ours"] + [f"hf_{impl}" for impl in args.hf_impls]
    memory: dict[str, float] = {}
    if args.device == "cuda":
        results = {}
        for side in sides:
            results.update(_measure_cuda_side(side, cfg, rows, args))
            memory[side] = results[side].pop("peak_mem_mb")
    else:
        steps = {side: make_step(side, cfg, rows, args) for side in sides}
        results = time_interleaved(steps, args)
        del steps
        if not args.no_memory:
            memory = {side: cpu_peak_memory(name, side, argv) for side in sides}
    return {"config": cfg.to_dict(), "results": results, "memory": memory}


def compare(record: dict, tokens: int, peak: float, seq: int) -> dict:
    """Per-side summaries and ours against the fastest HF implementation."""
    cfg = ModelConfig.from_dict(record["config"])
    fpt = cfg.flops_per_token(seq)
    results = {
        side: summarize(r, tokens, fpt, peak)
        | ({"peak_mem_mb": record["memory"][side]} if side in record["memory"] else {})
        for side, r in record["results"].items()
    }
    out = {
        "config": record["config"],
        "params": cfg.num_params(),
        "active_params": cfg.num_active_params(),
        "flops_per_token": fpt,
        "results": results,
    }
    hf_sides = [s for s in results if s != "ours"]
    if not hf_sides:
        return out
    best_side = max(hf_sides, key=lambda s: results[s]["tokens_per_s"])
    ours, best = results["ours"], results[best_side]
    out["hf_best"] = best_side
    out["speedup_vs_hf_best"] = round(ours["tokens_per_s"] / best["tokens_per_s"], 3)
    out["speedup_vs_hf_best_min_step"] = round(best["step_s_min"] / ours["step_s_min"], 3)
    # Steps are interleaved, so round i of each side saw the same machine state: the
    # median of per-round ratios is robust to a shared machine's drift between rounds.
    paired = [b / a for a, b in zip(ours["step_s"], best["step_s"], strict=True)]
    out["speedup_vs_hf_best_paired_median"] = round(statistics.median(paired), 3)
    if "peak_mem_mb" in ours and "peak_mem_mb" in best:
        out["memory_ratio_vs_hf_best"] = round(ours["peak_mem_mb"] / best["peak_mem_mb"], 3)
    return out


def geomean(values: list[float]) -> float:
    return round(math.exp(statistics.fmean(math.log(v) for v in values)), 3)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    configs = build_configs(args)
    dtype = DTYPES[args.dtype]
    peak = matmul_peak_flops(args.device, dtype)
    with scratch.scope():  # as the trainer runs: one pool for the whole run
        records = {name: measure_config(name, cfg, args, argv) for name, cfg in configs.items()}
    # Measured again after the runs: on a shared machine the best of both is the honest ceiling.
    peak = max(peak, matmul_peak_flops(args.device, dtype))
    tokens = args.batch * args.seq
    per_config = {name: compare(r, tokens, peak, args.seq) for name, r in records.items()}
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "ours": "jobs.train.step.train_step (forward with targets, backward, clip, AdamW, "
        "router-bias update)",
        "ours_backend": args.ours_backend,
        "optimizer": f"AdamW ({args.optimizer}), jobs.train.optim.build_optimizer",
        "matmul_peak_tflops": round(peak / 1e12, 3),
        "configs": per_config,
    }
    compared = [c for c in per_config.values() if "hf_best" in c]
    for key in ("speedup_vs_hf_best", "speedup_vs_hf_best_paired_median"):
        if compared:
            report[f"geomean_{key}"] = geomean([c[key] for c in compared])
    if compared and all("memory_ratio_vs_hf_best" in c for c in compared):
        report["max_memory_ratio_vs_hf_best"] = max(c["memory_ratio_vs_hf_best"] for c in compared)
    print(json.dumps(report, indent=2))


def _measure_cuda_side(side: str, cfg: ModelConfig, rows: torch.Tensor, args) -> dict[str, dict]:
    """One side at a time on the GPU, freed before the next, so peaks do not mix."""
    step = make_step(side, cfg, rows, args)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    record = time_interleaved({side: step}, args)
    record[side]["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del step
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
