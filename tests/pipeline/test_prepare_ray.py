"""prepare() on a real local Ray: parallelism-independent output, crash safety, S3 in/out."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import RUNTIME_ONLY
from pipeline.prepare import prepare
from pipeline.reader import DatasetReader
from tests.pipeline.conftest import tiny_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def content(manifest: dict) -> dict:
    """The manifest less what legitimately differs between two builds (time, speed, workers)."""
    out = {k: v for k, v in manifest.items() if k not in ("created_at", "build", "config")}
    out["config"] = {k: v for k, v in manifest["config"].items() if k not in RUNTIME_ONLY}
    return out


def test_same_output_at_one_and_two_workers(ray_local, clean_corpus, tmp_path):
    results = [
        prepare(tiny_config([str(clean_corpus)], num_workers=n), str(tmp_path / f"w{n}"), False)
        for n in (1, 2)
    ]
    results.append(prepare(tiny_config([str(clean_corpus)]), str(tmp_path / "l"), False, "local"))
    one, two, local = (content(r.manifest) for r in results)
    assert one == two == local
    assert one["splits"]["train"]["rows"] > 2 * 8, "want several shards to compare"
    for split in ("train", "val"):
        for shard in one["splits"][split]["shards"]:
            blobs = {(Path(r.uri) / shard["path"]).read_bytes() for r in results}
            assert len(blobs) == 1, shard["path"]


KILLED_RUN = """
import os, signal, sys
import pipeline.prepare as p
from tests.pipeline.conftest import tiny_config

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

p.write_manifest = die
p.prepare(tiny_config([sys.argv[1]]), sys.argv[2], progress=False, executor="local")
"""


def test_killed_before_manifest_then_rerun_completes(ray_local, clean_corpus, tmp_path):
    root = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(clean_corpus), str(root)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    (folder,) = (root / "datasets" / "tiny").iterdir()
    assert not (folder / "manifest.json").exists()
    assert list(folder.glob("train/part-*.parquet")), "the killed run wrote shards"
    (folder / "train" / "part-00000.parquet.tmp-deadbeef").write_bytes(b"half a shard")
    (folder / "train" / "part-00099.parquet").write_bytes(b"stale")

    rerun = prepare(tiny_config([str(clean_corpus)]), str(root), False)
    assert not rerun.cache_hit and rerun.uri == str(folder)
    listed = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    wanted = {s["path"] for sp in rerun.manifest["splits"].values() for s in sp["shards"]}
    assert listed == wanted | {
        "manifest.json",
        "tokenizer.json",
        "doc_hashes.npy",
        *rerun.manifest["quarantine"]["files"],
    }
    fresh = prepare(tiny_config([str(clean_corpus)]), str(tmp_path / "fresh"), False, "local")
    assert content(fresh.manifest) == content(rerun.manifest)
    ds = DatasetReader(rerun.uri)
    assert sum(
        len(ds.read_shard("train", i)) for i in range(len(ds.shards("train")))
    ) == ds.num_rows("train")


def test_s3_input_and_output(ray_local, s3_bucket, clean_corpus, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    for path in sorted(clean_corpus.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{s3_bucket}/corpus/{path.relative_to(clean_corpus)}")
    cfg = tiny_config([f"{s3_bucket}/corpus"])
    result = prepare(cfg, f"{s3_bucket}/out", False)
    assert result.uri.startswith(f"{s3_bucket}/out/datasets/tiny/")
    assert result.manifest["sources"][0]["path"].startswith(s3_bucket)
    assert all(s["mtime_or_etag"] for s in result.manifest["sources"])
    ds = DatasetReader(result.uri)
    assert ds.read_shard("train", 0).shape == (8, 32)
    assert ds.load_tokenizer().token_to_id("<eos>") == 2
    local = prepare(tiny_config([str(clean_corpus)]), str(tmp_path), False, "local")
    assert content(local.manifest)["splits"] == content(result.manifest)["splits"]
    assert prepare(cfg, f"{s3_bucket}/out", False).cache_hit
    stored = json.loads(fs.cat_file(f"{result.uri}/manifest.json"))
    assert stored["fingerprint"] == result.manifest["fingerprint"]
