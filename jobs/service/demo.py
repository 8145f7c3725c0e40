"""The main job on embedded defaults: ``moe-pretrain demo`` (what ``make demo`` runs).

Everything is local and offline: the built-in corpus (docstrings of the
installed Python standard library), a local Ray, a SQLite MLflow store and
``./outputs`` in the working directory, the ``tiny`` preset. ``configs/demo.yaml``
holds the same tree (a test keeps them equal) to copy and edit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

DEMO_TREE: dict[str, Any] = {
    "storage": {"root": "outputs"},
    "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "moe-pretrain-demo"},
    "data": {"name": "python-docs", "inputs": ["builtin://python-docs"], "seq_len": 256},
    "model": {"preset": "tiny"},
    "train": {"max_steps": 150, "micro_batch_size": 8, "eval_every": 50, "log_every": 5},
    "evaluate": {"max_batches": 6, "max_new_tokens": 24},
    "registry": {"model_name": "moe-pretrain-demo"},
}
SAMPLE_PROMPT = "Return the"


@dataclass
class DemoReport:
    model_uri: str
    first_loss: tuple[int, float]  # (step, train/loss)
    last_loss: tuple[int, float]
    val_loss: float | None
    sample: str
    ui_command: str
    cache_hits: dict[str, bool]


def demo_tree() -> dict[str, Any]:
    return copy.deepcopy(DEMO_TREE)


def loss_curve(client, run_id: str | None) -> list[tuple[int, float]]:
    if run_id is None:
        return []
    history = client.get_metric_history(run_id, "train/loss")
    return sorted((m.step, m.value) for m in history)


def run_demo(cfg) -> DemoReport:
    from jobs.errors import JobError
    from jobs.service.dag import run_pipeline
    from jobs.service.hf_folder import generate_text, load_model
    from jobs.service.tracking import make_client
    from jobs.tracking import resolve_tracking_uri

    result = run_pipeline(cfg, run_name="demo")
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    curve = loss_curve(make_client(cfg), result.train_run_id)
    if len(curve) < 2:
        raise JobError(f"demo: the training run logged {len(curve)} train/loss points")
    loaded = load_model(result.model_uri, tracking_uri)
    # Seeded nucleus sampling: greedy decoding of a model this small loops on one token.
    text = generate_text(loaded, SAMPLE_PROMPT, 40, temperature=0.8, top_p=0.95, seed=0)
    sample = SAMPLE_PROMPT + text
    return DemoReport(
        model_uri=result.model_uri,
        first_loss=curve[0],
        last_loss=curve[-1],
        val_loss=result.metrics.get("val/loss"),
        sample=sample,
        ui_command=f"mlflow ui --backend-store-uri {tracking_uri}",
        cache_hits=result.cache_hits,
    )
