"""The Kubernetes objects a deployer applies: each kustomization under infra/k8s rendered the way
``kubectl apply -k`` renders it, from a copy of infra/k8s whose Secret files are filled from the
``*.example`` templates (the deployer's first step).

With kubectl installed this is ``kubectl kustomize``. Without it, ``render_here`` applies the
parts of kustomize these kustomizations use (resources, components, namespace, images,
ConfigMap/Secret generators) itself; a test holds the two to the same output.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "infra" / "k8s"
# Someone's registry: the rendered manifests must carry it in every pod that runs our image.
REGISTRY_IMAGE = "registry.example.com/team/moe-pretrain"
# Every kustomization a deployer applies (infra/README.md): the base, one run, two schedules.
TARGETS = (".", "run", "schedule", "schedule-raycronjob")
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def prepare(k8s_dir: Path, dest: Path, image_name: str | None = None) -> Path:
    """A copy of ``k8s_dir`` with every Secret template copied to its real name, and the images
    component pointed at ``image_name`` when given (what the README asks the deployer to do)."""
    # A developer's filled-in Secret files never leave the repository: only the templates.
    shutil.copytree(k8s_dir, dest, ignore=_real_secrets)
    for example in (dest / "secrets").glob("*.example"):
        shutil.copy(example, example.with_suffix(""))
    if image_name:
        path = dest / "images" / "kustomization.yaml"
        comp = yaml.safe_load(path.read_text())
        for rule in comp["images"]:
            rule["newName"] = image_name
        path.write_text(yaml.safe_dump(comp))
    return dest


def _real_secrets(folder: str, names: list[str]) -> list[str]:
    if Path(folder).name != "secrets":
        return []
    return [n for n in names if not n.endswith(".example") and n != ".gitignore"]


def render(root: Path, target: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "kustomize", str(root / target)], capture_output=True, text=True, check=True
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    return render_here(root / target)


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def render_here(path: Path) -> list[dict[str, Any]]:
    """kustomize's build of ``path``, for the features the kustomizations here use."""
    k = _load(path)
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        target = path / res
        if target.is_dir():
            docs += render_here(target)
        else:
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    docs += _generated(path, k)
    images = list(k.get("images", []))
    for comp in k.get("components", []):
        c = _load(path / comp)
        images += c.get("images", [])
        docs += [d for r in c.get("resources", []) for d in yaml.safe_load_all((path / comp / r).read_text()) if d]  # fmt: skip
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] not in _CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = k["namespace"]
    for doc in docs:
        _retag(doc, images)
    return docs


def _generated(path: Path, k: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for gen in k.get(key, []):
            data: dict[str, str] = {}
            for env in gen.get("envs", []):
                for line in (path / env).read_text().splitlines():
                    if line.strip() and not line.lstrip().startswith("#"):
                        name, _, value = line.partition("=")
                        data[name.strip()] = value.strip()
            for spec in gen.get("files", []):
                name, _, src = spec.rpartition("=") if "=" in spec else ("", "", spec)
                data[name or Path(src).name] = (path / src).read_text()
            doc: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": kind,
                "metadata": {"name": gen["name"]},
            }
            if kind == "Secret":
                doc["type"] = "Opaque"
                data = {n: base64.b64encode(v.encode()).decode() for n, v in data.items()}
            doc["data"] = data
            out.append(doc)
    return out


def _split(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _retag(node: Any, rules: list[dict[str, Any]]) -> None:
    """kustomize's image transformer: every ``image`` of a container list, at any depth (so in
    custom resources too)."""
    if isinstance(node, list):
        for item in node:
            _retag(item, rules)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for c in value:
                if isinstance(c, dict) and "image" in c:
                    c["image"] = _apply(c["image"], rules)
        _retag(value, rules)


def _apply(image: str, rules: list[dict[str, Any]]) -> str:
    name, tag, digest = _split(image)
    for rule in rules:
        if rule["name"] == name:
            name = rule.get("newName", name)
            tag = rule.get("newTag", tag)
            if "digest" in rule:
                return f"{name}@{rule['digest']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
