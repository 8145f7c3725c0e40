"""MlflowTracker against a real ``mlflow server``: delivery, redaction, nesting, resume, and
an outage in the middle (a TCP proxy in front of the server that we switch off and on)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from jobs.tracking import NullTracker, flatten_params, resolve_tracking_uri
from jobs.tracking.mlflow_tracker import MlflowTracker


class SwitchableProxy:
    """Forwards TCP to ``target`` while up; while down, drops every connection at once,
    or, with ``hang``, accepts it and never answers (a server that is up but stuck)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = False
        self.hang = False
        self.held: list[socket.socket] = []
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
    assert tracker.run_id is None and tracker._warned
    proxy.up = True
    assert tracker.wait_for_run(timeout=30) is not None
    tracker.log({"train/loss": 51.0}, 51)
    tracker.close()
    proxy.close()

    client = MlflowClient(mlflow_server)
    losses = _history(client, tracker.run_id, "train/loss")
    assert losses == [(s, float(s)) for s in range(1, 52)]
    assert client.get_run(tracker.run_id).data.params["train.lr"] == "0.5"


def test_unreachable_to_the_end_spools_to_disk(tmp_path):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    tracker = MlflowTracker(
        f"http://127.0.0.1:{port}",
        run_name="never",
        retry_interval_s=0.2,
        close_timeout_s=1.0,
        spool_dir=str(tmp_path),
        system_metrics=False,
    )
    tracker.log({"train/loss": 2.0}, 1)
    tracker.close()
    spooled = (tmp_path / "pending.jsonl").read_text().splitlines()
    assert len(spooled) == 1 and '"train/loss": 2.0' in spooled[0]


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
