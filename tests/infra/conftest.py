"""What the infra tests read: the compose stack, the Kubernetes manifests, the Dockerfiles,
and a real ``mlflow server --app-name basic-auth`` with its own temporary user store.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kustomize_render
import pytest
import yaml
from servers import free_port, mlflow_server

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE_DIR = INFRA / "compose"
K8S_DIR = INFRA / "k8s"
DOCKER_DIR = INFRA / "docker"
# ${VAR}, ${VAR:-default} / ${VAR-default}, ${VAR:?error} / ${VAR?error}
_INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolations(text: str) -> list[tuple[str, str | None, str | None]]:
    """``${VAR}`` / ``${VAR:-default}`` / ``${VAR:?error}`` in a compose value:
    (name, operator or None, its argument or None)."""
    return [(m["name"], m["op"], m["arg"]) for m in _INTERPOLATION.finditer(text)]


def _default(m: re.Match) -> str | None:
    return m["arg"] if m["op"] in (":-", "-") else None


@dataclass
class Stack:
    """Everything under infra/, parsed once."""

    compose: dict[str, Any]
    env_example: dict[str, str]
    k8s: list[tuple[str, dict[str, Any]]]  # (path under infra/k8s, object), as written
    kustomization: dict[str, Any]
    dockerfiles: dict[str, str]
    repo: Path = REPO
    secret_keys: dict[str, set[str]] = field(default_factory=dict)
    configmap_data: dict[str, dict[str, str]] = field(default_factory=dict)

    def resolve(self, value: Any) -> str:
        """A compose value with ``${...}`` filled from .env.example (or the default)."""
        text = str(value)
        return _INTERPOLATION.sub(
            lambda m: self.env_example.get(m["name"]) or (_default(m) or ""), text
        )

    def service(self, name: str) -> dict[str, Any]:
        return self.compose["services"][name]

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [doc for _, doc in self.k8s if doc.get("kind") == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.objects(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    def pod_specs(self, doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """(label, pod template) for every pod a Kubernetes object creates, CRDs included."""
        kind, spec, name = doc.get("kind"), doc.get("spec") or {}, doc["metadata"].get("name", "")
        label = f"{kind}/{name or doc['metadata'].get('generateName', '')}"
        if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            return [(label, spec["template"])]
        if kind == "CronJob":
            return [(label, spec["jobTemplate"]["spec"]["template"])]
        if kind == "RayCluster":
            out = [(f"{label}/head", spec["headGroupSpec"]["template"])]
            return out + [
                (f"{label}/{g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]
            ]
        if kind == "RayJob":
            return self._rayjob_pods(label, spec)
        if kind == "RayCronJob":
            return self._rayjob_pods(label, spec["jobTemplate"])
        return []

    def _rayjob_pods(self, label: str, spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = []
        if "submitterPodTemplate" in spec:
            out.append((f"{label}/submitter", spec["submitterPodTemplate"]))
        if "rayClusterSpec" in spec:
            out += self.pod_specs(
                {"kind": "RayCluster", "metadata": {"name": label}, "spec": spec["rayClusterSpec"]}
            )
        return out

    @staticmethod
    def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
        spec = template.get("spec", {})
        return list(spec.get("initContainers", [])) + list(spec.get("containers", []))

    def k8s_env(self, container: dict[str, Any]) -> dict[str, str]:
        """Variable name -> where it comes from: ``value``, ``secret:NAME``, ``configmap:NAME``."""
        out: dict[str, str] = {}
        for src in container.get("envFrom", []):
            if "secretRef" in src:
                name = src["secretRef"]["name"]
                out.update({k: f"secret:{name}" for k in self.secret_keys.get(name, ())})
            if "configMapRef" in src:
                name = src["configMapRef"]["name"]
                out.update({k: f"configmap:{name}" for k in self.configmap_data.get(name, {})})
        for item in container.get("env", []):
            ref = item.get("valueFrom", {})
            if "secretKeyRef" in ref:
                out[item["name"]] = f"secret:{ref['secretKeyRef']['name']}"
            elif "configMapKeyRef" in ref:
                out[item["name"]] = f"configmap:{ref['configMapKeyRef']['name']}"
            else:
                out[item["name"]] = "value"
        return out

    @staticmethod
    def argv(command: Any) -> list[str]:
        return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _load_k8s() -> list[tuple[str, dict[str, Any]]]:
    """Every manifest under infra/k8s (not the kustomizations, not the pipeline config)."""
    docs = []
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        rel = path.relative_to(K8S_DIR)
        if path.name == "kustomization.yaml" or rel.parts[0] == "config":
            continue
        docs += [(rel.as_posix(), d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _generated(stack: Stack) -> None:
    """Secrets and ConfigMaps: the kustomize generators (keys from the *.example files), the
    manifests' ConfigMaps, and the token Secret the KubeRay operator generates."""
    for gen in stack.kustomization.get("secretGenerator", []):
        keys: set[str] = set()
        for env_file in gen.get("envs", []):
            keys |= set(read_env_file(K8S_DIR / f"{env_file}.example"))
        for spec in gen.get("files", []):
            keys.add(spec.split("=", 1)[0] if "=" in spec else Path(spec).name)
        stack.secret_keys[gen["name"]] = keys
    for gen in stack.kustomization.get("configMapGenerator", []):
        stack.configmap_data[gen["name"]] = {
            Path(f).name: (K8S_DIR / f).read_text() for f in gen.get("files", [])
        }
    for cm in stack.objects("ConfigMap"):
        stack.configmap_data[cm["metadata"]["name"]] = dict(cm.get("data", {}))
    for cluster in stack.objects("RayCluster"):  # KubeRay's authOptions generates this one
        if cluster["spec"].get("authOptions", {}).get("mode") == "token":
            stack.secret_keys[cluster["metadata"]["name"]] = {"auth_token"}


@pytest.fixture(scope="session")
def stack() -> Stack:
    s = Stack(
        compose=yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text()),
        env_example=read_env_file(COMPOSE_DIR / ".env.example"),
        k8s=_load_k8s(),
        kustomization=yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text()),
        dockerfiles={p.name: p.read_text() for p in sorted(DOCKER_DIR.glob("Dockerfile*"))
                     if not p.name.endswith(".dockerignore")},
    )  # fmt: skip
    _generated(s)
    return s


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """Kustomization -> the objects ``kubectl apply -k`` sends, after the deployer filled the
    Secret files and pointed the images component at their registry (REGISTRY_IMAGE)."""
    root = kustomize_render.prepare(
        K8S_DIR, tmp_path_factory.mktemp("k8s") / "k8s", image_name=kustomize_render.REGISTRY_IMAGE
    )
    return {target: kustomize_render.render(root, target) for target in kustomize_render.TARGETS}


@pytest.fixture(scope="session")
def rendered_objects(rendered) -> list[tuple[str, dict[str, Any]]]:
    """(kustomization, object) for everything any kustomization applies."""
    return [(target, doc) for target, docs in rendered.items() for doc in docs]


@pytest.fixture(scope="session")
def cli():
    """The real ``moe-pretrain`` click group, as the console script builds it."""
    import typer

    from jobs.cli import app

    return typer.main.get_command(app)


# --- a real MLflow server with basic auth -------------------------------------------------


@dataclass
class AuthServer:
    uri: str
    port: int
    admin: tuple[str, str]
    root: Path


@pytest.fixture(scope="session")
def mlflow_auth_server(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` on SQLite, default permission READ."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    port = free_port()
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Cache checked credentials: every request otherwise re-runs the password hash.
        "auth_cache_ttl_seconds = 60\n"
    )
    admin = ("admin", secrets.token_hex(16))
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    args = ["--app-name", "basic-auth", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    with mlflow_server(root, port, args, env) as uri:
        yield AuthServer(uri=uri, port=port, admin=admin, root=root)


def http(method: str, url: str, auth: tuple[str, str] | None = None, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> int:  # fmt: skip
    """Status code of one request (no redirects followed, no exception on 4xx)."""
    import base64
    import urllib.error

    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="session")
def http_status():
    return http
