"""Real services for the tests, started once per session.

- ``s3_endpoint``: moto in server mode (the S3 endpoint ``s3fs`` tests against),
  with the standard AWS variables pointed at it so s3fs, pyarrow and Ray workers
  all reach it.
- ``ray_local``: one local Ray (``address="local"``: never a cluster that a
  ``ray start`` elsewhere left behind), started after the S3 variables are set
  so its workers inherit them.
- ``mlflow_server``: a real ``mlflow server`` process on SQLite.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import servers
from servers import free_port, wait_http

# MLflow's telemetry thread sets and unsets an environment variable while other threads read
# os.environ (requests' proxy lookup), which raised KeyError '_MLFLOW_TELEMETRY_SESSION_ID' in
# a test here; the machine is offline anyway, so the tests and every server they start run
# without it.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket; returns ``s3://name``."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    import ray

    if ray.is_initialized():
        # A test that ran a stage without this fixture started its own Ray, without these settings.
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=2 * 1024**3,
        log_to_driver=True,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` (SQLite backend, local artifacts); yields its URI."""
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow"), free_port()) as uri:
        yield uri


@pytest.fixture
def mlflow_uri(mlflow_server, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@dataclass
class RayCluster:
    address: str  # dashboard URL, what the Jobs API is reached at
    token: str  # the token the cluster requires (token auth is on)
    temp_dir: Path
    home: Path  # the HOME it was started from: its token is in home/.ray/auth_token


def _ray_cluster_pids(temp_dir: Path) -> list[int]:
    """Processes of THIS cluster: their command lines name its private temp dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(temp_dir) in (proc / "cmdline").read_text():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head (``ray start --head --block``) with the Jobs API and token auth.

    Started the way a user starts one: ``ray get-auth-token --generate`` writes
    ``~/.ray/auth_token`` (here under a private HOME), then ``ray start --head``
    finds it and turns token auth on; neither ``RAY_AUTH_MODE`` nor
    ``RAY_AUTH_TOKEN`` is set. Every port is picked free so it never meets another
    cluster on this machine.
    Stopped by killing ITS process group (and any process naming its temp dir):
    never ``ray stop``, which would kill every Ray on the machine.
    """
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live here
    names = ("port", "dash", "client", "listen", "grpc", "rtenv", "metrics")
    picked: list[int] = []
    while len(picked) < len(names):  # free_port() can hand out one port twice: Ray refuses that
        if (port := free_port()) not in picked:
            picked.append(port)
    ports = dict(zip(names, picked, strict=True))
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--port", str(ports["port"]), "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(ports["dash"]), "--include-dashboard", "true",
        "--ray-client-server-port", str(ports["client"]),
        "--dashboard-agent-listen-port", str(ports["listen"]),
        "--dashboard-agent-grpc-port", str(ports["grpc"]),
        "--runtime-env-agent-port", str(ports["rtenv"]),
        "--metrics-export-port", str(ports["metrics"]),
        "--num-cpus", "2", "--temp-dir", str(temp), "--disable-usage-stats",
    ]  # fmt: skip
    home = temp / "home"
    home.mkdir()
    # PATH as in an activated venv: job entrypoints run ``python`` from the cluster's env.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "HOME": str(home), "PATH": path}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    token = (home / ".ray" / "auth_token").read_text().strip()
    address = f"http://127.0.0.1:{ports['dash']}"
    with open(temp / "start.log", "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            auth = {"Authorization": f"Bearer {token}"}
            wait_http(f"{address}/api/jobs/", timeout=240, proc=proc, headers=auth)
            yield RayCluster(address, token, temp, home)
        finally:
            _kill_cluster(proc, temp)
    shutil.rmtree(temp, ignore_errors=True)


def _kill_cluster(proc: subprocess.Popen, temp: Path) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in _ray_cluster_pids(temp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def one_torch_thread():
    """One torch thread, as a Ray worker runs (OMP_NUM_THREADS=1): on a busy 2-core machine
    two threads ran the training tests 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
