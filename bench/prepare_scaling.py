"""How much of ``prepare``'s CPU the driver spends, and whether more workers help; prints JSON.

Issue 17's measure of the single-process funnel. One local Ray (started here,
so its raylet and workers are this process's children) runs the product's
path, ``pipeline.prepare.prepare(executor="ray")``, on generated JSONL corpora
of two sizes at ``num_workers`` 1 and 2. For each run: wall seconds, tokens
per second, the driver's CPU seconds (this process) and the total CPU seconds
(this process and every process under it: raylet, GCS, workers). The
``marginal_driver_share`` is (driver CPU of the big corpus - of the small) /
(total CPU of the big - of the small): the driver's share of each extra
token's CPU, the number a cluster's ceiling follows from (issue 17's goal: at
most 1%). ``identical_bytes`` compares the shards' sha256 at 1 and 2 workers.

    python bench/prepare_scaling.py                       # 2 and 4 MB of text
    python bench/prepare_scaling.py --mb 8 16 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FILES_PER_CORPUS = 16


def write_corpus(folder: Path, megabytes: float, seed: int = 0) -> None:
    """``FILES_PER_CORPUS`` JSONL files of generated documents, ``megabytes`` of text in all."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)
    ]
    folder.mkdir(parents=True)
    per_file = int(megabytes * 1e6 / FILES_PER_CORPUS)
    for i in range(FILES_PER_CORPUS):
        with open(folder / f"part-{i:03d}.jsonl", "w") as f:
            written = 0
            while written < per_file:
                text = " ".join(rng.choices(words, k=rng.randint(50, 400))) + "."
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text)


class CpuMeter:
    """CPU seconds (user + system) of this process and of every process under it.

    Ray's actors exit when a dataset finishes, taking their CPU times with them, so
    a thread samples the process tree every ``interval`` seconds and keeps each
    process's last reading (a process that exits loses at most one interval)."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.seen: dict[tuple[int, float], float] = {}
        self.first: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil

        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                key = (proc.pid, proc.create_time())
                self.seen[key] = sum(proc.cpu_times()[:2])
            except psutil.Error:
                continue

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample()
        self.first = dict(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def driver(self) -> float:
        key = next(k for k in self.seen if k[0] == self.me.pid)
        return self.seen[key] - self.first.get(key, 0.0)

    @property
    def total(self) -> float:
        return sum(v - self.first.get(k, 0.0) for k, v in self.seen.items())


def run(corpus: Path, root: Path, workers: int) -> dict:
    from pipeline.config import PrepareConfig
    from pipeline.prepare import prepare

    cfg = PrepareConfig(
        name="scaling",
        inputs=[str(corpus)],
        vocab_size=4096,
        seq_len=256,
        tokenizer_sample_chars=500_000,
        num_workers=workers,
    )
    with CpuMeter() as cpu:
        start = time.perf_counter()
        result = prepare(cfg, str(root), progress=False, executor="ray")
        wall = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in result.manifest["splits"].values())
    shards = [s["sha256"] for split in result.manifest["splits"].values() for s in split["shards"]]
    return {
        "workers": workers,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall),
        "driver_cpu_s": round(cpu.driver, 2),
        "total_cpu_s": round(cpu.total, 2),
        "driver_share": round(cpu.driver / max(cpu.total, 1e-9), 4),
        "_shards": shards,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mb", type=float, nargs=2, default=[2.0, 4.0], help="the two corpus sizes"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {}
        for mb in args.mb:
            corpora[mb] = Path(tmp) / f"corpus-{mb}"
            write_corpus(corpora[mb], mb)
        # One unmeasured run first: Ray Data's first dataset pays the workers' start-up.
        run(corpora[args.mb[0]], Path(tmp) / "warm", args.workers[0])
        by = {
            (mb, w): run(corpora[mb], Path(tmp) / f"out-{mb}-{w}", w)
            for mb in args.mb
            for w in args.workers
        }
    ray.shutdown()
    small, big = args.mb
    marginal = {}
    for w in args.workers:
        a, b = by[(small, w)], by[(big, w)]
        marginal[str(w)] = round(
            (b["driver_cpu_s"] - a["driver_cpu_s"])
            / max(b["total_cpu_s"] - a["total_cpu_s"], 1e-9),
            4,
        )
    identical = {
        str(mb): len({tuple(by[(mb, w)]["_shards"]) for w in args.workers}) == 1 for mb in args.mb
    }
    runs = [{"corpus_mb": mb, **r} for (mb, _), r in by.items()]
    for r in runs:
        del r["_shards"]
    print(
        json.dumps(
            {
                "bench": "prepare_scaling",
                "corpus_mb": args.mb,
                "runs": runs,
                "marginal_driver_share": marginal,
                "identical_bytes": identical,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
