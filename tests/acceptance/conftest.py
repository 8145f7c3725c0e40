"""What a user has: a shell, the ``moe-pretrain`` CLI, a Ray head they started themselves
(``ray get-auth-token --generate``, ``ray start --head``: token auth on, no variable set)
and an ``mlflow server``. Every command here runs in its own process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORDS = [
    "the",
    "king",
    "and",
    "queen",
    "rode",
    "out",
    "at",
    "dawn",
    "to",
    "see",
    "the",
    "river",
    "while",
    "the",
    "old",
    "miller",
    "sang",
    "of",
    "bread",
    "and",
    "rain",
    "and",
    "every",
    "child",
    "of",
    "the",
    "town",
    "ran",
    "to",
    "the",
    "hill",
    "to",
    "watch",
    "them",
    "pass",
    "by",
]


def book(path: Path, seed: int, sentences: int = 900) -> Path:
    """One plain text file, the commonest first corpus: one document, no structure."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."
             for _ in range(sentences)]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class User:
    """Runs ``moe-pretrain`` as its own process, in the user's environment: HOME holds
    Ray's token file; no RAY_AUTH_TOKEN, RAY_AUTH_MODE or RAY_ADDRESS."""

    def __init__(self, home: Path, tracking_uri: str, cwd: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HOME=str(home), MLFLOW_TRACKING_URI=tracking_uri,
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
        self.env, self.cwd = env, cwd

    def run(self, *args: str, timeout: float = 300, check: bool = True):
        out = subprocess.run([str(BIN / "moe-pretrain"), *args], env=self.env, cwd=self.cwd,
                             capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if check and out.returncode != 0:
            raise AssertionError(f"moe-pretrain {' '.join(args)}: rc {out.returncode}\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")  # fmt: skip
        return out

    def popen(self, *args: str, log: Path) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen([str(BIN / "moe-pretrain"), *args], env=self.env,
                                    cwd=self.cwd, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip

    def wait_job(self, sid: str, address: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.run("status", sid, "--address", address).stdout.split()[-1]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2)
        raise TimeoutError(f"job {sid} still {status}")


@pytest.fixture
def user(ray_cluster, mlflow_server, tmp_path) -> User:
    return User(ray_cluster.home, mlflow_server, tmp_path)


def job_config(tmp_path: Path, inputs: list[str], **sections) -> Path:
    """A config a user would write for a first small run: tiny model, a few steps."""
    name = f"accept-{uuid.uuid4().hex[:8]}"
    tree = {
        "storage": {"root": str(tmp_path / "outputs")},
        "tracking": {"experiment": name},
        "data": {"inputs": inputs, "seq_len": 64, "vocab_size": 1024},
        "model": {"preset": "debug"},  # its own vocab_size is 512: the dataset's wins
        "train": {
            "max_steps": 6,
            "warmup_steps": 2,
            "log_every": 2,
            "eval_every": 6,
            "checkpoint_every": 6,
            "micro_batch_size": 8,
        },  # fmt: skip
        "evaluate": {"max_batches": 2, "max_new_tokens": 4},
        "registry": {"model_name": name},
        "cluster": {"working_dir": str(REPO)},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def job_info(address: str, token: str, sid: str) -> dict:
    """Everything the dashboard shows about a job, as anyone with access reads it."""
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    return json.loads(json.dumps(info.get_job_info(sid).__dict__, default=str))
