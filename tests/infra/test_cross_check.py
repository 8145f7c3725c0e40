"""The deployment files against the code they deploy: every command names a real
``moe-pretrain`` subcommand and option, every config they mount loads, every environment
variable the code reads is set, and the images agree between compose, Kubernetes and Docker.
Subcommands are read from the typer app at test time, so this follows the CLI as it grows.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import click
import pytest

from jobs.config import RootConfig
from jobs.settings import load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PIPELINE_ENV = {
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
}  # fmt: skip
PROJECT_VERSION = tomllib.loads(
    (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
)["project"]["version"]
COMPOSE_PIPELINE = ("ray-head", "ray-worker", "ray-worker-gpu", "scheduler")
# Read by the code but not a deployment setting; the reason is the documentation.
NOT_DEPLOYMENT_SETTINGS = {
    "MOE_PRETRAIN_GIT_COMMIT": "set by `moe-pretrain submit` on the job it submits",
    "MOE_PRETRAIN_SUBMISSION_ID": "set by `moe-pretrain submit` on the job it submits",
    "AWS_ENDPOINT_URL_S3": "optional S3-only override of AWS_ENDPOINT_URL",
}
_READ = [
    r"os\.environ\.get\(\s*{}",
    r"os\.getenv\(\s*{}",
    r"os\.environ\[\s*{}\s*\](?!\s*=[^=])",
    r"{}\s+in\s+os\.environ",
]
_NAME = r"(?:[\"'](?P<lit>[A-Z][A-Z0-9_]+)[\"']|(?P<ident>[A-Z][A-Z0-9_]*))"


def env_read_by_code(repo) -> dict[str, str]:
    """Environment variable -> a file that reads it (literals, and constants of any module)."""
    files = {
        path: path.read_text()
        for package in ("jobs", "pipeline", "moe_model")
        for path in sorted((repo / package).rglob("*.py"))
    }
    constants = {
        m[1]: m[2]
        for text in files.values()
        for m in re.finditer(r"^([A-Z][A-Z0-9_]*)\s*=\s*[\"']([A-Z][A-Z0-9_]+)[\"']", text, re.M)
    }
    found = {}
    for path, text in files.items():
        for pattern in _READ:
            for m in re.finditer(pattern.format(_NAME), text):
                name = m["lit"] or constants.get(m["ident"])
                if name:
                    found.setdefault(name, str(path.relative_to(repo)))
    return found


def without_deadline(argv: list[str]) -> list[str]:
    """The command behind coreutils ``timeout [OPTION]... DURATION`` (the RayJobs' own deadline)."""
    if argv and argv[0] == "timeout":
        rest = argv[1:]
        while rest[0].startswith("-"):
            rest = rest[1:]
        return rest[1:]
    return argv


def invocations(stack) -> list[tuple[str, list[str]]]:
    """(where, argv) of every command run in a project image, in compose and the manifests."""
    out = []
    for name, svc in stack.compose["services"].items():
        if "command" in svc and stack.resolve(svc["image"]).startswith("moe-pretrain:"):
            out.append((f"compose:{name}", stack.argv(svc["command"])))
    for file, doc in stack.k8s:
        for label, t in stack.pod_specs(doc):
            for c in stack.containers(t):
                if "command" in c or "args" in c:
                    out.append((f"{file}:{label}", [*c.get("command", []), *c.get("args", [])]))
        spec = doc.get("spec", {})
        for job in (spec, spec.get("jobTemplate", {})):
            if isinstance(job.get("entrypoint"), str):
                argv = without_deadline(stack.argv(job["entrypoint"]))
                out.append((f"{file}:{doc['kind']}.entrypoint", argv))
    return out


def _options(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def test_every_moe_pretrain_command_is_a_real_subcommand_with_real_options(stack, cli):
    calls = [(w, a) for w, a in invocations(stack) if a[0] == "moe-pretrain"]
    assert len(calls) >= 4  # scheduler, CronJob, RayJob, RayCronJob
    for where, args in calls:
        sub = cli.commands.get(args[1]) if len(args) > 1 else None
        assert sub is not None, f"{where}: `moe-pretrain {args[1:2]}` is not a subcommand"
        for arg in args[2:]:
            if arg.startswith("--"):
                opt = arg.split("=", 1)[0]
                assert opt in _options(sub), f"{where}: {opt} is not an option of {args[1]}"


def test_every_other_command_exists_in_the_image(stack):
    dockerfile = stack.dockerfiles["Dockerfile"]
    for where, args in invocations(stack):
        if args[0] == "python" and args[1].endswith(".py"):
            assert (stack.repo / args[1]).is_file(), f"{where}: {args[1]} missing"
            assert re.search(rf"COPY\s.*\b{re.escape(args[1])}\b", dockerfile), where
        else:
            assert args[0] in ("moe-pretrain", "mlflow", "ray"), f"{where}: {args[0]}"


def _compose_mount(svc: dict, target: str) -> str | None:
    for volume in svc.get("volumes", []):
        src, _, rest = volume.partition(":")
        if rest.split(":")[0] == target and src.startswith("."):
            return src
    return None


def _k8s_mount(stack, doc: dict, where: str, target: str) -> str | None:
    """The repo file behind ``target`` in the pod of ``where`` (a mounted generated ConfigMap)."""
    path = PurePosixPath(target)
    label = where.split(":", 1)[1]
    if label.endswith(".entrypoint"):  # the driver runs on the head of the selected cluster
        doc, label = stack.one("RayCluster"), "RayCluster/moe-pretrain/head"
    pods = dict(stack.pod_specs(doc))
    t = pods[label]["spec"]
    for c in t["containers"]:
        for m in c.get("volumeMounts", []):
            if m["mountPath"] == str(path.parent):
                vol = next(v for v in t["volumes"] if v["name"] == m["name"])
                gens = stack.kustomization["configMapGenerator"]
                gen = next(g for g in gens if g["name"] == vol["configMap"]["name"])
                return next(f for f in gen["files"] if PurePosixPath(f).name == path.name)
    return None


def test_every_config_a_command_reads_is_mounted_and_loads(stack):
    checked = set()
    docs = {f"{file}:{label}": doc for file, doc in stack.k8s for label, _ in stack.pod_specs(doc)}
    docs |= {f"{file}:{doc['kind']}.entrypoint": doc for file, doc in stack.k8s}
    for where, args in invocations(stack):
        if "--config" not in args:
            continue
        target = args[args.index("--config") + 1]
        if where.startswith("compose:"):
            src = _compose_mount(stack.service(where.split(":")[1]), target)
            path = stack.repo / "infra/compose" / src if src else None
        else:
            src = _k8s_mount(stack, docs[where], where, target)
            path = stack.repo / "infra/k8s" / src if src else None
        assert path is not None and path.is_file(), f"{where}: nothing mounted at {target}"
        load_config(RootConfig, path)
        checked.add(path)
    assert len(checked) == 2


def test_storage_roots_are_the_buckets_the_stacks_create(stack):
    compose_cfg = load_config(RootConfig, stack.repo / "infra/compose/pipeline.yaml")
    root = urlsplit(compose_cfg.storage.root)
    assert (root.scheme, root.netloc) == ("s3", stack.env_example["STORAGE_BUCKET"])
    k8s_cfg = load_config(RootConfig, stack.repo / "infra/k8s/config/pipeline.yaml")
    assert k8s_cfg.storage.root.startswith("s3://") and k8s_cfg.train.use_gpu is True
    gpu = next(g for g in stack.one("RayCluster")["spec"]["workerGroupSpecs"]
               if g["groupName"] == "gpu-workers")  # fmt: skip
    per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert k8s_cfg.train.num_workers <= gpu["maxReplicas"] * per_pod


def _k8s_pipeline_pods(stack):
    cluster = stack.one("RayCluster")
    yield from stack.pod_specs(cluster)
    yield from stack.pod_specs(stack.one("CronJob"))


def _operator_env(stack) -> set[str]:
    """What KubeRay sets on every Ray container itself (authOptions token mode)."""
    auth = stack.one("RayCluster")["spec"].get("authOptions", {})
    return {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} if auth.get("mode") == "token" else set()


def test_pipeline_processes_get_storage_tracking_and_ray_credentials_on_kubernetes(stack):
    for label, t in stack.pod_specs(stack.one("RayCluster")):
        env = set(stack.k8s_env(t["spec"]["containers"][0])) | _operator_env(stack)
        missing = PIPELINE_ENV - env
        assert not missing, f"{label} lacks {sorted(missing)}"


def test_every_variable_the_code_reads_is_set_in_both_stacks(stack):
    read = env_read_by_code(stack.repo)
    assert "MLFLOW_TRACKING_URI" in read  # the scan itself works
    compose = set().union(*(stack.service(s).get("environment", {}) for s in COMPOSE_PIPELINE))
    k8s = _operator_env(stack).union(
        *(stack.k8s_env(c) for _, t in _k8s_pipeline_pods(stack) for c in stack.containers(t))
    )
    for name, where in sorted(read.items()):
        if name in NOT_DEPLOYMENT_SETTINGS:
            continue
        assert name in compose, f"{name} (read in {where}) is set by no compose service"
        assert name in k8s, f"{name} (read in {where}) is set by no Kubernetes pipeline pod"


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_images_agree_between_compose_kubernetes_and_dockerfiles(stack, flavour):
    """One tag per flavour, <project version>-<flavour>, wherever the image is named."""
    tag = f"moe-pretrain:{PROJECT_VERSION}-{flavour}"
    dockerfile = "Dockerfile" if flavour == "cpu" else "Dockerfile.gpu"
    built = [s for s in stack.compose["services"].values()
             if s.get("build", {}).get("dockerfile") == f"infra/docker/{dockerfile}"]  # fmt: skip
    assert {stack.resolve(s["image"]) for s in built} == {tag}
    assert f"-t {tag} ." in stack.dockerfiles[dockerfile]
    k8s_images = {
        c["image"] for _, d in stack.k8s for _, t in stack.pod_specs(d) for c in stack.containers(t)
    }
    assert tag in k8s_images
    assert k8s_images <= {f"moe-pretrain:{PROJECT_VERSION}-{f}" for f in ("cpu", "gpu")}
    assert stack.env_example[f"MOE_PRETRAIN{'_GPU' if flavour == 'gpu' else ''}_IMAGE"] == tag
