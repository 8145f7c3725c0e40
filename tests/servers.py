"""Starting real servers in tests: a free port, waiting until a server answers HTTP, and a
real ``mlflow server`` on SQLite for as long as a ``with`` block lasts."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(
    url: str,
    timeout: float,
    proc: subprocess.Popen | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Return once ``url`` answers 2xx/3xx; fail early if ``proc`` exits first."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"no answer from {url} within {timeout}s")


@contextmanager
def mlflow_server(
    root: Path, port: int, args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """``mlflow server`` on a SQLite store and local artifacts under ``root`` (log:
    ``root/server.log``), plus ``args``; yields its URI once it answers, stops it after."""
    cmd = [
        sys.executable, "-m", "mlflow", "server", *args,
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", (root / "artifacts").as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        uri = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{uri}/health", timeout=120, proc=proc)
        except Exception as e:
            _stop(proc)  # not kill(): SIGKILL would leave its uvicorn and job workers running
            tail = (root / "server.log").read_text()[-2000:]
            raise RuntimeError(f"mlflow server {' '.join(args)} failed: {e}\n{tail}") from e
        try:
            yield uri
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
