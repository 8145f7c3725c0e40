"""Data-preparation benchmark; prints one JSON object.

1. Throughput per core, same text, same run, CPU time of one thread
   (``TOKENIZERS_PARALLELISM=false``): raw ``tokenizers`` ``encode_batch`` (and
   ``encode_batch_fast``) against the prepare pipeline's tokenize stage, and
   against read + clean + tokenize together.
2. Peak memory of a full ``prepare`` (local Ray) on a small and a large
   generated corpus, each in its own subprocess: peak RSS of the driver, and
   peak RSS / PSS summed over the whole process tree (driver, Ray daemons,
   workers; PSS splits shared object-store pages fairly). The large/small
   ratio is the number to watch: flat memory means about 1.

Text comes from /work/shared/data/tinyshakespeare.txt when present (random
spans of lines), else from synthetic words. Usage:
    python bench/tokenize_throughput.py [--sizes-mb 50 200] [--throughput-mb 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
FILE_MB = 8


def source_lines() -> list[str]:
    if SHAKESPEARE.is_file():
        return [line for line in SHAKESPEARE.read_text().split("\n")]
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(40000)]


def documents(lines: list[str], seed: int):
    """An endless stream of documents: random spans of 20-60 lines."""
    rng = random.Random(seed)
    while True:
        start = rng.randrange(len(lines))
        yield "\n".join(lines[start : start + rng.randint(20, 60)])


def write_corpus(folder: Path, megabytes: int, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents(lines, seed=megabytes)
    written, index = 0, 0
    while written < megabytes << 20:
        with open(folder / f"part-{index:04d}.jsonl", "w") as f:
            size = 0
            while size < FILE_MB << 20 and written + size < megabytes << 20:
                line = json.dumps({"text": next(docs)}) + "\n"
                f.write(line)
                size += len(line)
        written += size
        index += 1
    return folder


def train_tokenizer(path: Path, lines: list[str]) -> Path:
    from pipeline.config import SpecialTokens
    from pipeline.tokenizer import train_bpe

    docs = documents(lines, seed=1)
    sample = [next(docs) for _ in range(3000)]
    train_bpe(iter(sample), 8192, SpecialTokens()).save(str(path))
    return path


def cpu_seconds(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def throughput(tokenizer_path: Path, lines: list[str], megabytes: int) -> dict:
    from tokenizers import Tokenizer

    from pipeline.clean import CleanStage
    from pipeline.config import CleanConfig, PrepareConfig
    from pipeline.source_readers import read_records
    from pipeline.sources import list_sources
    from pipeline.stage import ReadStage, records_table
    from pipeline.tokenize_stage import TokenizeStage

    tok = Tokenizer.from_file(str(tokenizer_path))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp), megabytes, lines)
        cfg = PrepareConfig(inputs=[str(corpus)], tokenizer=str(tokenizer_path))
        sources = list_sources(cfg.inputs)
        texts = [r[0] for s in sources for r in read_records(s, cfg) if r[3] is None]
        files = {"files": json.dumps([s.to_dict() for s in sources])}
        read_s = cpu_seconds(lambda: list(ReadStage(cfg)(pa_table([files]))), repeat=1)
    raw_table = records_table([(t, "s", i, 0, None, None) for i, t in enumerate(texts)])
    clean = CleanStage(CleanConfig())
    cleaned = clean(raw_table)
    stage = TokenizeStage(tok.to_str(), eos_id=2, batch_size=256)
    stage.ensure_setup()
    batches = [cleaned.slice(i, 256) for i in range(0, cleaned.num_rows, 256)]
    tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts))
    raw_s = cpu_seconds(lambda: tok.encode_batch(texts, add_special_tokens=False))
    fast_s = cpu_seconds(lambda: tok.encode_batch_fast(texts, add_special_tokens=False))
    stage_s = cpu_seconds(lambda: [stage(b) for b in batches])
    clean_s = cpu_seconds(lambda: clean(raw_table))
    pipeline_s = read_s + clean_s + stage_s
    return {
        "megabytes": megabytes,
        "documents": len(texts),
        "tokens": tokens,
        "raw_encode_batch_tokens_per_s": round(tokens / raw_s),
        "raw_encode_batch_fast_tokens_per_s": round(tokens / fast_s),
        "tokenize_stage_tokens_per_s": round(tokens / stage_s),
        "read_clean_tokenize_tokens_per_s": round(tokens / pipeline_s),
        "stage_vs_raw_encode_batch": round(raw_s / stage_s, 3),
        "stage_vs_raw_encode_batch_fast": round(fast_s / stage_s, 3),
        "pipeline_vs_raw_encode_batch": round(raw_s / pipeline_s, 3),
        "cpu_seconds": {
            "read": round(read_s, 3),
            "clean": round(clean_s, 3),
            "tokenize_stage": round(stage_s, 3),
            "raw_encode_batch": round(raw_s, 3),
        },
    }


def pa_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
from pipeline.config import PrepareConfig
from pipeline.prepare import prepare
cfg = PrepareConfig(name="bench", inputs=[sys.argv[1]], tokenizer=sys.argv[2], val_fraction=0.01)
start = time.monotonic()
result = prepare(cfg, sys.argv[3], progress=False)
seconds = time.monotonic() - start
tokens = sum(s["tokens"] + s["remainder_tokens"] for s in result.manifest["splits"].values())
import ray
cpus = int(ray.cluster_resources().get("CPU", 1))
print(json.dumps({"seconds": round(seconds, 1), "tokens": tokens, "cpus": cpus,
                  "tokens_per_s": round(tokens / seconds),
                  "tokens_per_s_per_core": round(tokens / seconds / cpus),
                  "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def tree_memory(pid: int) -> tuple[float, float]:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    rss = pss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss / 2**20, pss / 2**20


def memory_run(corpus: Path, tokenizer_path: Path, out: Path) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(corpus), str(tokenizer_path), str(out), str(REPO)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    peak = {"rss": 0.0, "pss": 0.0}

    def sample() -> None:
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"prepare subprocess failed with {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_peak_rss_mb"] = round(peak["rss"])
    result["tree_peak_pss_mb"] = round(peak["pss"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="*", default=[50, 200])
    parser.add_argument("--throughput-mb", type=int, default=8)
    args = parser.parse_args()
    lines = source_lines()
    report: dict = {"text": "tinyshakespeare spans" if SHAKESPEARE.is_file() else "synthetic"}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = train_tokenizer(Path(tmp) / "tokenizer.json", lines)
        report["throughput_per_core"] = throughput(tokenizer_path, lines, args.throughput_mb)
        memory = {}
        for size in args.sizes_mb:
            corpus = write_corpus(Path(tmp) / f"corpus-{size}", size, lines)
            memory[f"{size}MB"] = memory_run(corpus, tokenizer_path, Path(tmp) / f"out-{size}")
        if len(args.sizes_mb) >= 2:
            small, large = (memory[f"{s}MB"] for s in (min(args.sizes_mb), max(args.sizes_mb)))
            for key in ("tree_peak_pss_mb", "tree_peak_rss_mb", "driver_peak_rss_mb"):
                memory[f"ratio_{key}"] = round(large[key] / max(small[key], 1), 3)
        report["memory"] = memory
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
