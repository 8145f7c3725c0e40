"""The compose stack, read as data: services, ports that agree, no open port, no literal secret."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from jobs.security import is_secret_key

from_env = re.compile(r"^\$\{[A-Z0-9_]+\}$")
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "mlflow-bootstrap", "ray-head",
            "ray-worker", "ray-worker-gpu", "scheduler"}  # fmt: skip
# Every process that runs pipeline code: Ray nodes (drivers and workers) and the scheduler.
PIPELINE = ("ray-head", "ray-worker", "ray-worker-gpu", "scheduler")
PIPELINE_ENV = {
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
}  # fmt: skip


def option(args: list[str], name: str) -> str:
    """``--name value`` or ``--name=value`` from an argument list."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def env(stack, service: str) -> dict[str, str]:
    return {k: str(v) for k, v in (stack.service(service).get("environment") or {}).items()}


def test_the_stack_has_every_service(stack):
    assert set(stack.compose["services"]) == SERVICES


def test_published_ports_bind_localhost_only(stack):
    published = 0
    for name, svc in stack.compose["services"].items():
        for port in svc.get("ports", []):
            published += 1
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert published >= 2  # the MLflow UI and the Ray dashboard, through a tunnel


def test_every_variable_comes_from_env_example(stack):
    text = (stack.repo / "infra/compose/docker-compose.yml").read_text()
    used = {m for m in re.findall(r"\$\{([A-Z0-9_]+)\}", text)}
    assert used <= set(stack.env_example), f"not in .env.example: {used - set(stack.env_example)}"
    with_default = set(re.findall(r"\$\{([A-Z0-9_]+):-", text))
    assert set(stack.env_example) <= used | with_default, "stale keys in .env.example"


def test_secrets_are_never_literal(stack):
    for name in stack.compose["services"]:
        for key, value in env(stack, name).items():
            if is_secret_key(key):
                assert from_env.match(value), f"{name}: {key} is a literal, not ${{VAR}} from .env"
    for key, value in stack.env_example.items():
        if is_secret_key(key):
            assert value == "change-me", f".env.example: {key} must be a placeholder"


def test_pipeline_processes_get_storage_tracking_and_ray_credentials(stack):
    for name in PIPELINE:
        missing = PIPELINE_ENV - set(env(stack, name))
        assert not missing, f"{name} lacks {sorted(missing)}"
        assert env(stack, name)["RAY_AUTH_MODE"] == "token"


def test_mlflow_is_locked_down_and_reachable_where_clients_point(stack):
    args = [stack.resolve(a) for a in stack.argv(stack.service("mlflow")["command"])]
    assert args[:2] == ["mlflow", "server"] and option(args, "--app-name") == "basic-auth"
    port = option(args, "--port")
    allowed = option(args, "--allowed-hosts").split(",")
    assert "*" not in allowed and f"localhost:{port}" in allowed
    for name in (*PIPELINE, "mlflow-bootstrap"):
        uri = urlsplit(env(stack, name)["MLFLOW_TRACKING_URI"])
        assert uri.hostname == "mlflow" and str(uri.port) == port, f"{name}: {uri.geturl()}"
        assert uri.netloc in allowed, f"{uri.netloc} missing from --allowed-hosts"
    assert stack.service("mlflow")["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f"localhost:{port}/health" in str(stack.service("mlflow")["healthcheck"]["test"])


def test_mlflow_auth_config_holds_no_credentials(stack):
    mlflow = env(stack, "mlflow")
    mounts = {m.split(":")[1]: m.split(":")[0] for m in stack.service("mlflow")["volumes"]}
    ini = stack.repo / "infra/compose" / mounts[mlflow["MLFLOW_AUTH_CONFIG_PATH"]]
    text = ini.read_text()
    assert "default_permission = READ" in text
    assert not re.search(r"^\s*admin_password", text, re.M)
    assert not re.search(r"://[^/\s]*@", text), "a URI with credentials in the auth config"
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(mlflow)


def test_mlflow_stores_point_at_postgres_and_a_bucket_the_init_job_creates(stack):
    mlflow = env(stack, "mlflow")
    backend = urlsplit(stack.resolve(mlflow["MLFLOW_BACKEND_STORE_URI"]))
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres"
    assert backend.path.lstrip("/") == stack.env_example["POSTGRES_DB"]
    args = stack.argv(stack.service("mlflow")["command"])
    assert option(args, "--artifacts-destination") == "s3://${MLFLOW_BUCKET}"
    init = env(stack, "minio-init")
    script = "\n".join(stack.service("minio-init")["command"])
    assert init["MLFLOW_BUCKET"] == "${MLFLOW_BUCKET}" and "$$MLFLOW_BUCKET" in script
    assert init["STORAGE_BUCKET"] == "${STORAGE_BUCKET}" and "$$STORAGE_BUCKET" in script
    assert urlsplit(mlflow["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"


def test_ray_ports_agree(stack):
    head = stack.argv(stack.service("ray-head")["command"])
    gcs, dashboard = option(head, "--port"), option(head, "--dashboard-port")
    assert option(head, "--num-cpus") == "0"
    for worker in ("ray-worker", "ray-worker-gpu"):
        args = stack.argv(stack.service(worker)["command"])
        assert option(args, "--address") == f"ray-head:{gcs}", worker
    assert env(stack, "scheduler")["RAY_ADDRESS"] == f"http://ray-head:{dashboard}"
    assert stack.service("ray-head")["ports"] == [f"127.0.0.1:{dashboard}:{dashboard}"]


def test_storage_endpoint_and_bucket_agree(stack):
    minio = stack.argv(stack.service("minio")["command"])
    port = option(minio, "--address").lstrip(":")
    for name in PIPELINE:
        endpoint = urlsplit(env(stack, name)["AWS_ENDPOINT_URL"])
        assert (endpoint.hostname, str(endpoint.port)) == ("minio", port), name


def test_gpu_worker_reserves_gpus_and_uses_the_gpu_image(stack):
    gpu = stack.service("ray-worker-gpu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "infra/docker/Dockerfile.gpu"
    assert stack.resolve(gpu["image"]).endswith(":gpu")
