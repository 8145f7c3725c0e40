"""Training artifacts: per-expert routing table + heatmap, and sample generations.

Per-expert token counts are E x L numbers per log interval: as metric keys they
would drown the MLflow UI (thousands of series for Mixtral-scale configs), so
they go to one CSV (all snapshots, for analysis) and one heatmap PNG (the
latest snapshot, overwritten as training goes on).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

ROUTING_TABLE = "expert_tokens.csv"
ROUTING_HEATMAP = "expert_heatmap.png"
SAMPLES = "generations.txt"


class RoutingArtifacts:
    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.table = self.dir / ROUTING_TABLE
        self.heatmap = self.dir / ROUTING_HEATMAP

    def add(self, step: int, tokens_le: np.ndarray) -> None:
        """Append one snapshot: ``tokens_le[layer, expert]`` tokens routed since the last one."""
        new = not self.table.exists()
        totals = tokens_le.sum(axis=1, keepdims=True)
        frac = np.divide(tokens_le, totals, out=np.zeros_like(tokens_le), where=totals > 0)
        with self.table.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "layer", "expert", "tokens", "fraction"])
            for layer, expert in np.ndindex(*tokens_le.shape):
                writer.writerow(
                    [
                        step,
                        layer,
                        expert,
                        int(tokens_le[layer, expert]),
                        f"{frac[layer, expert]:.6f}",
                    ]
                )
        self._plot(step, frac)

    def _plot(self, step: int, frac_le: np.ndarray) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers, experts = frac_le.shape
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * layers + 2), max(3, 0.4 * experts + 1.5)))
        image = ax.imshow(frac_le.T, aspect="auto", cmap="viridis", vmin=0.0, origin="lower")
        ax.set_xlabel("layer")
        ax.set_ylabel("expert")
        ax.set_xticks(range(layers))
        ax.set_yticks(range(experts))
        ax.set_title(f"fraction of tokens per expert, step {step}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(self.heatmap, dpi=80)
        plt.close(fig)


def append_samples(path: str | Path, step: int, samples: list[tuple[str, str]]) -> Path:
    """Append ``(prompt, completion)`` pairs under a step header; returns the file."""
    path = Path(path)
    with path.open("a") as f:
        f.write(f"=== step {step} ===\n")
        for prompt, completion in samples:
            f.write(f"[prompt] {prompt!r}\n{prompt}{completion}\n\n")
    return path
