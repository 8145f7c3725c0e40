"""The compose stack, read as data: services, ports that agree, no open port, no literal secret."""

from __future__ import annotations

import json
import re
import subprocess
from urllib.parse import urlsplit

from conftest import interpolations

from pipeline.redaction import is_secret_key

# A whole value taken from .env, required: ${VAR:?message}
from_env = re.compile(r"^\$\{[A-Z0-9_]+:\?[^}]*\}$")
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


def _compose_text(stack) -> str:
    """Every value of the compose file (comments left out), one per line."""

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)
        else:
            yield str(node)

    return "\n".join(walk(stack.compose))


def test_every_variable_comes_from_env_example(stack):
    found = interpolations(_compose_text(stack))
    used = {name for name, _, _ in found}
    assert used <= set(stack.env_example), f"not in .env.example: {used - set(stack.env_example)}"
    assert set(stack.env_example) <= used, "stale keys in .env.example"


def test_every_variable_is_required_or_has_a_default(stack):
    """A bare ${VAR} becomes "" when unset and compose starts anyway; ${VAR:?} refuses to."""
    for name, op, _ in interpolations(_compose_text(stack)):
        assert op in (":?", ":-"), f"${{{name}}} neither required nor defaulted"
        if is_secret_key(name):
            assert op == ":?", f"the secret {name} must be required"


def test_secrets_are_never_literal(stack):
    for name in stack.compose["services"]:
        for key, value in env(stack, name).items():
            if is_secret_key(key):
                assert from_env.match(value), (
                    f"{name}: {key} is a literal, not ${{VAR:?}} from .env"
                )


def test_the_example_env_does_not_start_until_every_secret_is_set(stack):
    """compose's ${VAR:?} fails on an empty value: the template leaves every secret empty."""
    required = {name for name, op, _ in interpolations(_compose_text(stack)) if op == ":?"}
    unset = {k for k, v in stack.env_example.items() if v == ""}
    secrets = {k for k in stack.env_example if is_secret_key(k) or k.endswith("PASSWORD")}
    assert secrets and secrets <= unset <= required, secrets - unset
    for key in unset:
        assert stack.env_example[key] == "", key


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
    bucket = stack.resolve(option(args, "--artifacts-destination"))
    assert bucket == f"s3://{stack.env_example['MLFLOW_BUCKET']}"
    init = env(stack, "minio-init")
    script = "\n".join(stack.service("minio-init")["command"])
    for name in ("MLFLOW_BUCKET", "STORAGE_BUCKET"):
        assert init[name].startswith(f"${{{name}:?") and f"$${name}" in script, name
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
    assert stack.resolve(gpu["image"]).endswith("-gpu")


def _minio_script(stack) -> str:
    return "\n".join(stack.service("minio-init")["command"])


def _grants(stack) -> dict[str, tuple[str, str]]:
    """S3 identity variable -> (policy name, bucket variable) from minio-init's grant lines."""
    found = re.findall(
        r'^grant "\$\$(\w+)" "\$\$\w+" ([\w-]+) "\$\$(\w+)"$', _minio_script(stack), re.M
    )
    return {identity: (policy, bucket) for identity, policy, bucket in found}


def _policy(stack, bucket: str) -> dict:
    script = _minio_script(stack)
    template = script[script.index("<<EOF\n") + 6 : script.index("\nEOF")]
    return json.loads(template.replace("$$4", bucket))


def test_pipeline_and_mlflow_hold_separate_identities_scoped_to_their_buckets(stack):
    def key_var(service: str) -> str:
        return env(stack, service)["AWS_ACCESS_KEY_ID"][2:].split(":")[0]

    pipeline = {key_var(s) for s in PIPELINE}
    (mlflow,) = {key_var("mlflow")}
    assert pipeline == {"S3_PIPELINE_ACCESS_KEY_ID"} and mlflow == "S3_MLFLOW_ACCESS_KEY_ID"
    users = {s for s in stack.compose["services"] if mlflow in json.dumps(stack.service(s))}
    assert users == {"mlflow", "minio-init"}, "only the MLflow server holds the artifact keys"
    grants = _grants(stack)
    assert {k: b for k, (_, b) in grants.items()} == {
        "S3_PIPELINE_ACCESS_KEY_ID": "STORAGE_BUCKET",
        "S3_MLFLOW_ACCESS_KEY_ID": "MLFLOW_BUCKET",
    }
    for _, (policy, bucket_var) in grants.items():
        bucket = stack.env_example[bucket_var]
        statements = _policy(stack, bucket)["Statement"]
        resources = {r for s in statements for r in s["Resource"]}
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, policy
        assert all(s["Effect"] == "Allow" and "*" not in str(s["Action"]) for s in statements)


def test_the_bucket_job_fails_when_a_policy_cannot_be_attached(stack):
    init = stack.service("minio-init")
    script = _minio_script(stack)
    assert init["entrypoint"] == ["/bin/sh", "-ec"]
    assert "|| true" not in script and "readwrite" not in script
    attach = script[script.index("mc admin policy attach") :]
    # Only MinIO's answer to a second attach of the same policy is tolerated.
    tolerated = re.search(r"^\s*(.+?)\) ;;$", attach, re.M)[1].split("|")
    assert tolerated == ['*"already in effect"*', '*"has no net effect"*'] and "exit 1" in attach
    for svc in ("mlflow",):
        assert stack.service(svc)["depends_on"]["minio-init"] == {
            "condition": "service_completed_successfully"
        }


def _bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)b?", str(value).lower())
    assert m, value
    return int(float(m[1]) * 1024 ** " kmg".index(m[2] or " "))


def test_every_service_has_cpu_and_memory_limits(stack):
    for name, svc in stack.compose["services"].items():
        limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
        assert float(limits.get("cpus", 0)) > 0, f"{name}: no CPU limit"
        assert _bytes(limits.get("memory", "0")) > 0, f"{name}: no memory limit"


def test_ray_nodes_have_a_dev_shm_for_the_object_store(stack):
    from ray._private.ray_constants import DEFAULT_OBJECT_STORE_MEMORY_PROPORTION as share

    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        svc = stack.service(name)
        memory = _bytes(svc["deploy"]["resources"]["limits"]["memory"])
        assert share * memory <= _bytes(svc["shm_size"]) < memory, name


def test_ray_head_has_a_healthcheck_the_nodes_wait_for(stack):
    test = stack.service("ray-head")["healthcheck"]["test"]
    head = stack.argv(stack.service("ray-head")["command"])
    assert f"http://localhost:{option(head, '--dashboard-port')}/api/gcs_healthz" in test[-1]
    for name in ("ray-worker", "ray-worker-gpu", "scheduler"):
        assert stack.service(name)["depends_on"]["ray-head"] == {"condition": "service_healthy"}


_FAKE_MC = """#!/bin/sh
# Stands in for MinIO's client: logs each call, keeps the policies, answers attach as told.
echo "$*" >> "$MC_DIR/calls"
case "$1 $2 $3" in
  "admin policy create") cp "$6" "$MC_DIR/$5.json" ;;
  "admin policy attach") [ -z "$MC_ATTACH_ERROR" ] || { echo "mc: <ERROR> $MC_ATTACH_ERROR" >&2; exit 1; } ;;
esac
"""


def _run_bucket_job(stack, tmp_path, attach_error: str) -> subprocess.CompletedProcess:
    """minio-init's script as its container runs it (sh -ec, compose's $$ unescaped), with a
    fake ``mc`` first on PATH and the .env.example values, secrets filled in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "work").mkdir(exist_ok=True)
    (bin_dir / "mc").write_text(_FAKE_MC)
    (bin_dir / "mc").chmod(0o755)
    script = _minio_script(stack).replace("$$", "$").replace("/tmp/", f"{tmp_path}/work/")
    init = {
        k: stack.resolve(v) or f"secret-{k.lower()}" for k, v in env(stack, "minio-init").items()
    }
    env_vars = {**init, "PATH": f"{bin_dir}:/usr/bin:/bin", "MC_DIR": str(tmp_path),
                "MC_ATTACH_ERROR": attach_error}  # fmt: skip
    return subprocess.run(["/bin/sh", "-ec", script], env=env_vars, capture_output=True, text=True)


def test_the_bucket_job_runs_twice_but_stops_on_any_other_attach_failure(stack, tmp_path):
    ok = _run_bucket_job(stack, tmp_path, "")
    assert ok.returncode == 0, ok.stderr
    for policy, bucket in (
        ("pipeline-storage", "moe-pretrain"),
        ("mlflow-artifacts", "mlflow-artifacts"),
    ):
        statements = json.loads((tmp_path / f"{policy}.json").read_text())["Statement"]
        assert {r for s in statements for r in s["Resource"]} == {
            f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}  # fmt: skip
    calls = (tmp_path / "calls").read_text().splitlines()
    assert (
        "admin policy attach local pipeline-storage --user secret-s3_pipeline_access_key_id"
        in calls
    )
    again = _run_bucket_job(stack, tmp_path, "The specified policy change is already in effect.")
    assert again.returncode == 0, again.stderr
    denied = _run_bucket_job(stack, tmp_path, "Access Denied.")
    assert denied.returncode != 0 and "attaching policy pipeline-storage" in denied.stderr
