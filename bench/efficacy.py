"""MoE against dense at equal active compute, and MoE upcycled from a dense checkpoint.

Prepares the corpus once (the built-in one by default), then trains, through the trainer's
own worker loop (``jobs.train.loop.run``, no Ray, no shortcuts), at ``--budgets`` token
budgets spaced by ``--ratio`` up to ``--tokens``:

- ``moe``: the preset (top-k of E experts), from scratch;
- ``dense``: ``ModelConfig.dense_equivalent()``: one expert of hidden top_k x F, equal
  active parameters and FLOPs per token;
- ``upcycled``: the preset's one-expert sibling (the MoE with E = 1, hidden F) for half the
  budget, written as a Llama folder, then ``train.init_from: upcycle:PATH`` (every expert a
  copy of its MLP; Komatsuzaki et al. 2022) and the MoE for the other half. Its dense half
  costs fewer FLOPs per token than the other arms: ``train_flops`` in the JSON says so.

Every run uses the same schedule shape (warmup fraction, cosine to ``min_lr_ratio``), batch
and seed; each is scored by the trainer's ``val/loss`` on the same held-out rows. Writes
``--out`` (JSON) and a PNG beside it (held-out loss against tokens, one line per kind);
budgets that repeat training data (epochs > 1) are marked in both.

    python bench/efficacy.py --out bench/results/efficacy.json          # CPU, debug preset
    python bench/efficacy.py --preset small --tokens 100000000 --seq-len 1024 \\
        --micro-batch 16 --device cuda --input /data/corpus --out efficacy-h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from jobs.tracking.recorder import Recorder  # noqa: E402

KINDS = ("moe", "dense", "upcycled")
NEVER = 10**9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", action="append", help="Corpus URI(s); default the built-in one.")
    p.add_argument("--preset", default="debug")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="model fields")
    p.add_argument("--tokens", type=int, default=400_000, help="The largest budget.")
    p.add_argument("--budgets", type=int, default=3)
    p.add_argument("--ratio", type=float, default=2.0, help="Between consecutive budgets.")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--eval-batches", type=int, default=32, help="Cap on held-out micro batches.")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch.")
    p.add_argument("--work", default=None, help="Folder for the dataset and checkpoints.")
    p.add_argument("--out", required=True, help="JSON report; the PNG goes beside it.")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    bad = sorted(set(args.kinds) - set(KINDS))
    if bad:
        p.error(f"--kinds: unknown kind {bad[0]!r}, expected some of {', '.join(KINDS)}")
    if args.budgets < 1 or args.tokens < 1 or args.seeds < 1 or args.ratio <= 1:
        p.error("--budgets, --tokens and --seeds must be positive, --ratio above 1")
    return args


def prepare_dataset(args, work: Path) -> str:
    from pipeline.config import PrepareConfig
    from pipeline.prepare import prepare

    cfg = PrepareConfig(
        name="efficacy",
        inputs=args.input or ["builtin://python-docs"],
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        max_documents=args.max_documents,
        shard_rows=1024,
    )
    return prepare(cfg, str(work / "storage"), progress=False, executor="local").uri


def budgets(args, tokens_per_step: int) -> list[tuple[int, int]]:
    """(tokens, steps) per budget, largest = ``--tokens``; steps even (the upcycled halves)."""
    out = []
    for i in range(args.budgets):
        target = args.tokens / args.ratio ** (args.budgets - 1 - i)
        steps = max(2, 2 * round(target / tokens_per_step / 2))
        out.append((steps * tokens_per_step, steps))
    return sorted(set(out))


def model_sets(moe_cfg, cfg) -> list[str]:
    """``--set`` items that turn the run's model section into ``cfg``."""
    base = moe_cfg.to_dict()
    return [f"model.{k}={json.dumps(v)}" for k, v in cfg.to_dict().items() if v != base[k]]


def root_config(args, work: Path, reader, steps: int, seed: int, model: list[str]):
    from jobs.config import RootConfig
    from jobs.settings import load_config

    val_rows = reader.num_rows("val")
    eval_batches = max(1, min(args.eval_batches, val_rows // args.micro_batch))
    sets = [
        f"storage.root={work / 'storage'}",
        f"model.preset={args.preset}",
        *(f"model.{s}" for s in args.set),
        f"model.vocab_size={reader.vocab_size}",
        *model,
        f"train.max_steps={steps}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.seed={seed}",
        f"train.lr={args.lr}",
        f"train.warmup_steps={max(1, round(args.warmup_frac * steps))}",
        f"train.log_every={max(1, steps // 20)}",
        f"train.eval_every={NEVER}",
        f"train.checkpoint_every={NEVER}",
        f"train.eval_batches={eval_batches}",
        "train.sample_prompts=[]",
    ]
    cfg = load_config(RootConfig, None, sets)
    if cfg.model.build().max_seq_len < reader.seq_len:
        cfg = load_config(RootConfig, None, [*sets, f"model.max_seq_len={reader.seq_len}"])
    return cfg


def train(args, cfg, dataset: str, out_dir: Path | None = None, init_from: str | None = None):
    """One run of the trainer's loop; (metrics, perf summary, checkpoint)."""
    from jobs.train import loop
    from jobs.train.env import LocalEnv

    recorder = Recorder()
    env = LocalEnv(out_dir, keep=1, device=torch.device(args.device))
    start = time.perf_counter()
    result = loop.run(cfg, dataset, env, tracking=recorder, init_from=init_from)
    wall = time.perf_counter() - start
    if result.get("aborted"):
        raise SystemExit(f"efficacy: a run stopped: {result['aborted']}")
    rows = [m for _, m in recorder.logs if "perf/step_time_s" in m]
    step_time = sum(m["perf/step_time_s"] for m in rows)
    tokens = sum(m["perf/tokens_per_s"] * m["perf/step_time_s"] for m in rows)
    last = rows[-1]
    imbalance = [v for k, v in last.items() if k.endswith("/load_imbalance")]
    perf = {
        "tokens_per_s": round(tokens / step_time, 1) if step_time else math.nan,
        "wall_s": round(wall, 2),
        "final_train_loss": round(float(last["train/ce_loss"]), 4),
        "max_load_imbalance": round(max(imbalance), 4) if imbalance else math.nan,
    }
    return result["metrics"], perf, result.get("checkpoint")


def run_plain(args, kind, moe_cfg, work, reader, dataset, tokens, steps, seed) -> dict:
    cfg_model = moe_cfg if kind == "moe" else moe_cfg.dense_equivalent()
    cfg = root_config(args, work, reader, steps, seed, model_sets(moe_cfg, cfg_model))
    metrics, perf, _ = train(args, cfg, dataset)
    return record(kind, cfg_model, tokens, seed, metrics["val/loss"], perf, reader, steps) | {
        "train_flops": cfg_model.flops_per_token(reader.seq_len) * tokens
    }


def run_upcycled(args, moe_cfg, work, reader, dataset, tokens, steps, seed) -> dict:
    from jobs.train.checkpoint import load_checkpoint_model
    from moe_model.upcycle import save_dense_hf

    half = steps // 2
    sibling = moe_cfg.replace(num_experts=1, top_k=1)
    cfg = root_config(args, work, reader, half, seed, model_sets(moe_cfg, sibling))
    run_dir = work / f"dense-{tokens}-{seed}"
    dense_metrics, dense_perf, checkpoint = train(args, cfg, dataset, out_dir=run_dir)
    model, _, _ = load_checkpoint_model(checkpoint)
    folder = save_dense_hf(model, work / "storage" / f"dense-{tokens}-{seed}")
    # Another data order for the second half: a fresh run with the same seed would start the
    # same permutation again and repeat exactly the rows the dense half saw.
    cfg = root_config(args, work, reader, steps - half, seed + 1, [])
    metrics, perf, _ = train(args, cfg, dataset, init_from=f"upcycle:{folder}")
    half_tokens = tokens // 2
    flops = sibling.flops_per_token(reader.seq_len) + moe_cfg.flops_per_token(reader.seq_len)
    out = record("upcycled", moe_cfg, tokens, seed, metrics["val/loss"], perf, reader, steps)
    out["tokens_per_s"] = round(
        tokens / (half_tokens / dense_perf["tokens_per_s"] + half_tokens / perf["tokens_per_s"]), 1
    )
    out["wall_s"] = round(dense_perf["wall_s"] + perf["wall_s"], 2)
    return out | {
        "train_flops": flops * half_tokens,
        "dense_phase": {
            "tokens": half_tokens,
            "active_params": sibling.num_active_params(),
            "val_loss": round(dense_metrics["val/loss"], 5),
            "tokens_per_s": dense_perf["tokens_per_s"],
        },
    }


def record(kind, cfg, tokens, seed, val_loss, perf, reader, steps) -> dict[str, Any]:
    epochs = tokens / (reader.num_rows("train") * reader.seq_len)
    return {
        "kind": kind,
        "tokens": tokens,
        "steps": steps,
        "active_params": cfg.num_active_params(),
        "total_params": cfg.num_params(),
        "val_loss": round(float(val_loss), 5),
        "seed": seed,
        "epochs": round(epochs, 3),
        "repeats_data": epochs > 1,
        **perf,
    }


def summarize(runs: list[dict]) -> list[dict]:
    """Per budget: mean held-out loss per kind and each kind's change against dense."""
    out = []
    for tokens in sorted({r["tokens"] for r in runs}):
        at = [r for r in runs if r["tokens"] == tokens]
        mean = {
            k: sum(r["val_loss"] for r in at if r["kind"] == k)
            / max(1, sum(r["kind"] == k for r in at))
            for k in KINDS
            if any(r["kind"] == k for r in at)
        }
        row = {"tokens": tokens, "epochs": at[0]["epochs"], "val_loss": mean}
        if "dense" in mean:
            row["vs_dense_pct"] = {
                k: round(100 * (v / mean["dense"] - 1), 2) for k, v in mean.items() if k != "dense"
            }
        out.append(row)
    return out


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for kind in KINDS:
        mine = sorted((r for r in runs if r["kind"] == kind), key=lambda r: r["tokens"])
        if not mine:
            continue
        xs = sorted({r["tokens"] for r in mine})
        ys = [
            sum(r["val_loss"] for r in mine if r["tokens"] == x)
            / sum(r["tokens"] == x for r in mine)
            for x in xs
        ]
        (line,) = ax.plot(xs, ys, marker="o", label=kind)
        repeats = [(x, y) for x, y in zip(xs, ys, strict=True) if _repeats(mine, x)]
        if repeats:
            ax.scatter(*zip(*repeats, strict=True), s=120, facecolors="none", edgecolors="k")
        ax.scatter([r["tokens"] for r in mine], [r["val_loss"] for r in mine],
                   s=10, color=line.get_color(), alpha=0.5)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title, fontsize=9)
    if any(r["repeats_data"] for r in runs):
        ax.plot([], [], "o", mfc="none", mec="k", ms=10, label="epochs > 1")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _repeats(runs: list[dict], tokens: int) -> bool:
    return any(r["repeats_data"] for r in runs if r["tokens"] == tokens)


def main(argv: list[str] | None = None) -> dict:
    from jobs.config import ModelSection
    from pipeline.reader import DatasetReader

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-efficacy-"))
    start = time.perf_counter()
    dataset = prepare_dataset(args, work)
    reader = DatasetReader(dataset)
    if reader.num_rows("val") == 0:
        raise SystemExit(
            f"efficacy: dataset {dataset} has no held-out rows; raise --val-fraction "
            f"({args.val_fraction}) or give more documents"
        )
    prepare_s = time.perf_counter() - start
    overrides = dict(s.split("=", 1) for s in args.set)
    moe_cfg = ModelSection.model_validate(
        {"preset": args.preset, **{k: json.loads(v) for k, v in overrides.items()}}
    ).build()
    moe_cfg = moe_cfg.replace(
        vocab_size=reader.vocab_size, max_seq_len=max(moe_cfg.max_seq_len, reader.seq_len)
    )
    tokens_per_step = args.micro_batch * reader.seq_len
    runs = []
    for seed in range(args.seeds):
        for tokens, steps in budgets(args, tokens_per_step):
            for kind in args.kinds:
                common = (args, moe_cfg, work, reader, dataset, tokens, steps, seed)
                run = (
                    run_upcycled(*common)
                    if kind == "upcycled"
                    else run_plain(args, kind, *common[1:])
                )
                print(json.dumps(run), file=sys.stderr, flush=True)
                runs.append(run)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "runs": runs,
        "summary": summarize(runs),
        "command": " ".join(["python", "bench/efficacy.py", *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": {"preset": args.preset, **moe_cfg.to_dict()},
        "dense_model": moe_cfg.dense_equivalent().to_dict(),
        "train": {
            "micro_batch": args.micro_batch,
            "seq_len": reader.seq_len,
            "lr": args.lr,
            "warmup_frac": args.warmup_frac,
            "schedule": "cosine",
        },  # fmt: skip
        "dataset": {
            "uri": dataset,
            "inputs": args.input or ["builtin://python-docs"],
            "fingerprint": reader.fingerprint,
            "train_tokens": reader.num_rows("train") * reader.seq_len,
            "val_rows": reader.num_rows("val"),
            "vocab_size": reader.vocab_size,
        },
        "prepare_s": round(prepare_s, 2),
        "wall_s": round(time.perf_counter() - start, 2),
        "plot": str(out_path.with_suffix(".png")),
    }
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    title = (
        f"{args.preset}: E={moe_cfg.num_experts} top-{moe_cfg.top_k} vs dense "
        f"F={moe_cfg.dense_equivalent().intermediate_size}, "
        f"{moe_cfg.num_active_params() / 1e6:.2f}M active"
    )
    plot(runs, out_path.with_suffix(".png"), title)
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main()
