"""Evaluate a model: loss and perplexity on fixed eval sets, expert load, sample generations.

The loss here is the plain next-token cross-entropy (no aux or z terms), summed
over every target token and divided once, so two models evaluated on the same
rows give numbers that can be compared: that is what the champion gate does.
Eval sets are the dataset's val split (first ``max_batches`` batches, in
manifest order) and, optionally, a held-out corpus tokenized with the
dataset's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from jobs.errors import JobError
from jobs.service.config import EvaluateConfig
from jobs.train.step import perplexity
from moe_model.routing_stats import metric_key
from pipeline.config import PrepareConfig


@dataclass
class EvalSet:
    name: str
    rows: np.ndarray  # [N, seq_len + 1] token ids
    digest: str  # sha256 of the rows: "same eval data" means the same digest


@dataclass
class EvalResult:
    metrics: dict[str, float]
    expert_load: list[dict[str, Any]]
    samples: list[dict[str, str]]
    eval_data: dict[str, str] = field(default_factory=dict)

    def gate_loss(self, metric: str) -> tuple[str, float]:
        """The metric the champion gate compares (``auto`` = held-out when there is one)."""
        if metric == "auto":
            metric = "heldout/loss" if "heldout/loss" in self.metrics else "val/loss"
        if metric not in self.metrics:
            where = "evaluate.inputs" if metric == "heldout/loss" else "the dataset's val split"
            raise JobError(
                f"registry.gate_metric: {metric} was not measured ({where} has no rows of "
                f"seq_len + 1 tokens); give more text, a shorter data.seq_len, or evaluate.inputs"
            )
        return metric, self.metrics[metric]


def rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows.astype(np.int64)).tobytes()).hexdigest()


def val_set(reader, cfg: EvaluateConfig) -> EvalSet | None:
    """The first ``batch_size * max_batches`` val rows, in manifest order."""
    want = cfg.batch_size * cfg.max_batches
    parts, have = [], 0
    for i in range(len(reader.shards("val"))):
        if have >= want:
            break
        block = reader.read_shard("val", i)
        parts.append(block[: want - have])
        have += len(parts[-1])
    if not have:
        return None
    rows = np.concatenate(parts).astype(np.int64)
    return EvalSet("val", rows, rows_digest(rows))


def heldout_set(
    inputs: list[str], data: PrepareConfig, tokenizer, eos_id: int, cfg: EvaluateConfig
) -> EvalSet | None:
    """Documents from ``inputs`` joined with EOS and cut into rows of ``seq_len + 1``."""
    from pipeline.source_readers import read_records
    from pipeline.sources import list_sources

    ids: list[int] = []
    want = cfg.batch_size * cfg.max_batches * (data.seq_len + 1)
    for src in list_sources(inputs, data.s3):
        for text, _, _, reason, _ in read_records(src, data):
            if reason is None and text:
                ids.extend(tokenizer.encode(text).ids)
                ids.append(eos_id)
            if len(ids) >= want:
                break
    n = min(len(ids), want) // (data.seq_len + 1)
    if n == 0:
        return None
    rows = np.asarray(ids[: n * (data.seq_len + 1)], dtype=np.int64).reshape(n, data.seq_len + 1)
    return EvalSet("heldout", rows, rows_digest(rows))


@torch.no_grad()
def loss_on(model, rows: np.ndarray, batch_size: int) -> tuple[dict[str, float], list[Any]]:
    """Mean next-token cross-entropy over all targets; also the summed expert counts per layer."""
    total, count, per_layer = 0.0, 0, None
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(rows[start : start + batch_size])
        targets = batch[:, 1:]
        # The model's own fused head + loss (as training): a mean over the batch's targets,
        # weighted back to a sum so batches of any size count per token.
        out = model(batch[:, :-1], targets=targets)
        total += out.ce_loss.double().item() * targets.numel()
        count += targets.numel()
        counts = [r.tokens_per_expert.double() for r in out.routing]
        per_layer = (
            counts if per_layer is None else [a + b for a, b in zip(per_layer, counts, strict=True)]
        )
    loss = total / count
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": float(count)}, (per_layer or [])


def expert_load(per_layer: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Per layer: each expert's share of routed tokens, max/mean imbalance, dead experts."""
    table = []
    for layer, counts in enumerate(per_layer):
        share = (counts / counts.sum().clamp_min(1)).tolist()
        mean = counts.mean().item()
        table.append(
            {
                "layer": layer,
                "share": [round(s, 6) for s in share],
                "load_imbalance": counts.max().item() / mean if mean > 0 else 0.0,
                "dead_experts": int((counts == 0).sum().item()),
            }
        )
    return table


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], cfg: EvaluateConfig, eos_id: int | None):
    """Greedy (or tempered) continuations of fixed prompts, so runs can be compared by eye."""
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt).ids
        if not ids or cfg.max_new_tokens == 0:
            out.append({"prompt": prompt, "completion": ""})
            continue
        seq = model.generate(
            torch.tensor([ids]),
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            eos_token_id=eos_id,
        )
        out.append({"prompt": prompt, "completion": tokenizer.decode(seq[0, len(ids) :].tolist())})
    return out


def evaluate_model(model, tokenizer, eval_sets: list[EvalSet], cfg: EvaluateConfig, eos_id: int):
    """All of the above on ``eval_sets``; expert load is measured on the first set."""
    model.eval()
    metrics: dict[str, float] = {}
    load: list[dict[str, Any]] = []
    for es in eval_sets:
        m, per_layer = loss_on(model, es.rows, cfg.batch_size)
        metrics.update({f"{es.name}/{k}": v for k, v in m.items()})
        if not load:
            load = expert_load(per_layer)
    if load:
        imbalance_max = metric_key("load_imbalance", prefix="eval/moe") + "_max"
        metrics[imbalance_max] = max(r["load_imbalance"] for r in load)
        metrics[metric_key("dead_experts", prefix="eval/moe")] = float(
            sum(r["dead_experts"] for r in load)
        )
    samples = sample(model, tokenizer, cfg.prompts, cfg, eos_id)
    return EvalResult(metrics, load, samples, {es.name: es.digest for es in eval_sets})


def write_report(result: EvalResult, folder) -> list[str]:
    """``metrics.json``, ``expert_load.json`` and ``samples.json`` in ``folder``; their paths."""
    paths = []
    for name, payload in (
        ("metrics.json", {"metrics": result.metrics, "eval_data": result.eval_data}),
        ("expert_load.json", result.expert_load),
        ("samples.json", result.samples),
    ):
        path = f"{folder}/{name}"
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        paths.append(path)
    return paths
