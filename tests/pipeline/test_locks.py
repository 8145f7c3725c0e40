"""``storage_lock`` in two processes, on local disk and on S3 (a conditional create): the
second waits while the first holds it, then gets it. What serialises two prepares of one
dataset, two trainings of one run (two pipeline runs of one config) and the champion gate."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import logging, sys
from pipeline.locks import storage_lock

logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
uri, journal, me = sys.argv[1:]
with storage_lock(uri):
    with open(journal, "a") as f:
        f.write(f"enter {me}\\n")
    print("held", flush=True)
    sys.stdin.readline()
    with open(journal, "a") as f:
        f.write(f"exit {me}\\n")
"""


def _holder(uri: str, journal: Path, me: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, uri, str(journal), me],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_second_process_waits_for_the_first(where, tmp_path, request):
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path / "root")
    uri, journal = f"{root}/runs/train-abc.lock", tmp_path / "journal"
    first = _holder(uri, journal, "first")
    assert first.stdout.readline().strip() == "held"
    second = _holder(uri, journal, "second")
    try:
        assert second.stdout.readline().startswith("waiting for ")  # blocked, not in
        _release(first)
        assert first.wait(timeout=60) == 0
        assert second.stdout.readline().strip() == "held"
        _release(second)
        assert second.wait(timeout=60) == 0
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    assert journal.read_text().split("\n")[:-1] == [
        "enter first", "exit first", "enter second", "exit second",
    ]  # fmt: skip


def test_a_killed_holder_never_leaves_a_stale_local_lock(tmp_path):
    uri, journal = str(tmp_path / "root" / "run.lock"), tmp_path / "journal"
    first = _holder(uri, journal, "first")
    assert first.stdout.readline().strip() == "held"
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = _holder(uri, journal, "second")
    try:
        assert second.stdout.readline().strip() == "held"
        _release(second)
        assert second.wait(timeout=60) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert journal.read_text().split("\n")[:-1] == ["enter first", "enter second", "exit second"]
