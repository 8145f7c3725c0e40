"""MlflowTracker against a real ``mlflow server``: delivery, redaction, nesting, resume, an
outage in the middle (a TCP proxy in front of the server that we switch off and on), a tracker
SIGKILLed during an outage whose spool the resumed run delivers, and a server answering 429."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from jobs.tracking import NullTracker, flatten_params, resolve_tracking_uri
from jobs.tracking.mlflow_tracker import MlflowTracker
from jobs.tracking.spool import Spool


class SwitchableProxy:
    """Forwards TCP to ``target`` while up; while down, drops every connection at once,
    or, with ``hang``, accepts it and never answers (a server that is up but stuck)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = False
        self.hang = False
        self.held: list[socket.socket] = []
        self.live: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.up:
                if self.hang:
                    self.held.append(client)
                else:
                    client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.live += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        """Stop hanging: every held connection is dropped, later ones too."""
        self.hang = False
        for client in self.held:
            client.close()

    def cut(self) -> None:
        """Go down, dropping the connections already open too (clients keep them alive)."""
        self.up = False
        for s in self.live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.live.clear()

    def close(self) -> None:
        self.sock.close()


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_tracker_delivers_redacted_params_metrics_artifacts_nested(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    exp = f"exp-{uuid.uuid4().hex[:8]}"
    parent = client.create_run(client.create_experiment(exp)).info.run_id
    tracker = MlflowTracker(mlflow_server, exp, run_name="t1", parent_run_id=parent)
    tracker.log_params(
        {"train": {"lr": 0.001}, "storage": {"root": "s3://user:pw@host/x"}, "s3": {"secret": "x"}}
    )
    for step in range(1, 4):
        tracker.log({"train/loss": 1.0 / step}, step)
    artifact = tmp_path / "generations.txt"
    artifact.write_text("first")
    tracker.log_artifact(str(artifact), "samples")
    artifact.write_text("changed after logging")
    tracker.close()

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t1"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.params["storage.root"] == "s3://***@host/x"
    assert run.data.params["s3.secret"] == "***"
    assert _history(client, tracker.run_id, "train/loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    local = client.download_artifacts(tracker.run_id, "samples/generations.txt", str(tmp_path))
    assert Path(local).read_text() == "first"

    again = MlflowTracker(mlflow_server, exp, run_name="t1", system_metrics=False)
    again.log({"train/loss": 0.1}, 4)
    again.close()
    assert again.run_id == tracker.run_id and again.resumed
    assert _history(client, tracker.run_id, "train/loss")[-1] == (4, 0.1)


def test_logging_never_blocks_and_an_outage_loses_nothing(mlflow_server):
    proxy = SwitchableProxy(int(mlflow_server.rsplit(":", 1)[1]))
    uri = f"http://127.0.0.1:{proxy.port}"
    exp = f"outage-{uuid.uuid4().hex[:8]}"
    proxy.hang = True  # a stuck server: any call that waits on it never returns
    tracker = MlflowTracker(uri, exp, run_name="o", retry_interval_s=0.3, system_metrics=False)

    def log_everything() -> None:
        for step in range(1, 51):
            tracker.log({"train/loss": float(step)}, step)
        tracker.log_params({"train": {"lr": 0.5}})

    caller = threading.Thread(target=log_everything, daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "log() waited on a server that never answers"
    assert tracker.run_id is None  # nothing could have reached the server yet
    proxy.release()
    time.sleep(1.0)
    assert tracker.run_id is None and tracker.retry.warned
    proxy.up = True
    assert tracker.wait_for_run(timeout=30) is not None
    tracker.log({"train/loss": 51.0}, 51)
    tracker.close()
    proxy.close()

    client = MlflowClient(mlflow_server)
    losses = _history(client, tracker.run_id, "train/loss")
    assert losses == [(s, float(s)) for s in range(1, 52)]
    assert client.get_run(tracker.run_id).data.params["train.lr"] == "0.5"


def _dead_uri() -> str:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    return f"http://127.0.0.1:{port}"


def _spooled_steps(spool: Spool) -> list[int]:
    return sorted(i[2] for name in spool.segments() for i in spool.read(name) if i[0] == "metrics")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_unreachable_to_the_end_spools_and_the_next_start_delivers(
    where, mlflow_server, tmp_path, request, caplog
):
    """Local disk or S3 (a segment per write, no append): the spool outlives the tracker,
    the next tracker of the run delivers it once and deletes it."""
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    spool_uri = f"{root}/runs/r/mlflow-spool"
    key, exp = f"run-{uuid.uuid4().hex[:8]}", f"spool-{uuid.uuid4().hex[:8]}"
    opts = dict(run_key=key, system_metrics=False, retry_interval_s=0.2, spool_uri=spool_uri)
    tracker = MlflowTracker(_dead_uri(), exp, close_timeout_s=1.0, **opts)
    tracker.log_params({"train": {"lr": 0.5}})
    for step in (1, 2):
        tracker.log({"train/loss": float(step)}, step)
    with caplog.at_level("WARNING", logger="jobs.tracking.mlflow_tracker"):
        tracker.close()
    assert f"2 metrics spooled at {spool_uri}, not delivered: MLflow at" in caplog.text
    assert _spooled_steps(Spool(spool_uri)) == [1, 2]

    again = MlflowTracker(mlflow_server, exp, **opts)
    again.log({"train/loss": 3.0}, 3)
    again.close()
    client = MlflowClient(mlflow_server)
    assert _history(client, again.run_id, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert client.get_run(again.run_id).data.params == {"train.lr": "0.5"}
    assert Spool(spool_uri).segments() == []


KILLED_TRACKER = """
import sys
from jobs.tracking.mlflow_tracker import MlflowTracker

uri, spool, key, exp = sys.argv[1:]
tracker = MlflowTracker(uri, exp, run_name="killed", run_key=key, system_metrics=False,
                        retry_interval_s=0.2, spool_uri=spool, spool_interval_s=0.5)
tracker.log_params({"train": {"lr": 0.5}})
print(tracker.wait_for_run(60), flush=True)
sys.stdin.readline()  # the parent cuts MLflow off
for step in range(1, 21):
    tracker.log({"train/loss": float(step)}, step)
print(tracker.flush(), flush=True)  # what the loop does at a checkpoint
for step in range(21, 41):
    tracker.log({"train/loss": float(step)}, step)
print("logged", flush=True)
sys.stdin.readline()  # SIGKILLed here
"""


def test_a_tracker_killed_during_an_outage_loses_nothing(mlflow_server, tmp_path):
    """SIGKILL while MLflow is unreachable: what was logged is in the run's spool (at the
    checkpoint's flush, and within ``spool_interval_s`` after it); the resumed run delivers
    every metric exactly once."""
    proxy = SwitchableProxy(int(mlflow_server.rsplit(":", 1)[1]))
    proxy.up = True
    spool_uri = str(tmp_path / "runs" / "r" / "mlflow-spool")
    key, exp = f"run-{uuid.uuid4().hex[:8]}", f"killed-{uuid.uuid4().hex[:8]}"
    args = [f"http://127.0.0.1:{proxy.port}", spool_uri, key, exp]
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_TRACKER, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    try:
        run_id = child.stdout.readline().strip()
        assert run_id not in ("", "None")
        proxy.cut()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "True"  # flushed into the spool
        assert child.stdout.readline().strip() == "logged"
        spool, deadline = Spool(spool_uri), time.monotonic() + 60
        while _spooled_steps(spool) != list(range(1, 41)) and time.monotonic() < deadline:
            time.sleep(0.1)  # the interval write, no flush asked for it
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        proxy.close()
    assert _spooled_steps(spool) == list(range(1, 41))

    resumed = MlflowTracker(mlflow_server, exp, run_key=key, system_metrics=False,
                            spool_uri=spool_uri)  # fmt: skip
    resumed.log({"train/loss": 41.0}, 41)
    resumed.close()
    assert resumed.resumed and resumed.run_id == run_id
    client = MlflowClient(mlflow_server)
    assert _history(client, run_id, "train/loss") == [(s, float(s)) for s in range(1, 42)]
    assert spool.segments() == []


class Throttling(http.server.ThreadingHTTPServer):
    """A reverse proxy in front of MLflow that answers 429 to its first ``busy`` requests."""

    def __init__(self, target: str, busy: int) -> None:
        self.target, self.busy, self.throttled = target, busy, 0
        super().__init__(("127.0.0.1", 0), _ThrottlingHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.server_address[1]}"


class _ThrottlingHandler(http.server.BaseHTTPRequestHandler):
    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.throttled < self.server.busy:
            self.server.throttled += 1
            status, data = 429, b"slow down"
        else:
            headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
            url = self.server.target + self.path
            req = urllib.request.Request(url, body or None, headers, method=self.command)
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    status, data = resp.status, resp.read()
            except urllib.error.HTTPError as e:
                status, data = e.code, e.read()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def test_a_throttling_server_gets_everything_after_backoff(mlflow_server):
    """HTTP 429 is retried (with backoff), never dropped."""
    proxy = Throttling(mlflow_server, busy=4)
    tracker = MlflowTracker(proxy.uri, f"busy-{uuid.uuid4().hex[:8]}", system_metrics=False,
                            retry_interval_s=0.05, run_name="busy")  # fmt: skip
    for step in (1, 2, 3):
        tracker.log({"train/loss": float(step)}, step)
    tracker.close()
    proxy.shutdown()
    assert proxy.throttled == 4 and tracker.dropped == 0
    losses = _history(MlflowClient(mlflow_server), tracker.run_id, "train/loss")
    assert losses == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_tracking_uri_resolution_and_helpers(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None) == "http://env:5000"
    assert resolve_tracking_uri("http://explicit") == "http://explicit"
    assert flatten_params({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": {},
    }
    null = NullTracker()
    null.log({"x": 1.0}, 1)
    null.close()


@pytest.mark.parametrize("status", ["FINISHED", "FAILED"])
def test_close_sets_the_run_status(mlflow_server, status):
    tracker = MlflowTracker(mlflow_server, "status", run_name=f"s-{uuid.uuid4().hex[:6]}")
    tracker.log({"x": 1.0}, 1)
    tracker.close(status)
    assert MlflowClient(mlflow_server).get_run(tracker.run_id).info.status == status
