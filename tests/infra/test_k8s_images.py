"""One way of setting the image: the deployer points the images component at their registry
(infra/README.md, step 1), and every pod any kustomization applies runs from there, at the
project's version."""

from __future__ import annotations

import shutil
from pathlib import Path

import kustomize_render
import pytest
from kustomize_render import K8S_DIR, REGISTRY_IMAGE

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

VERSION = tomllib.loads((K8S_DIR.parents[1] / "pyproject.toml").read_text())["project"]["version"]


def _images(stack, docs) -> list[tuple[str, str]]:
    out = []
    for doc in docs:
        for label, template in stack.pod_specs(doc):
            out += [(label, c["image"]) for c in stack.containers(template)]
        auto = doc.get("spec", {}).get("autoscalerOptions", {})
        if "image" in auto:
            out.append((f"{doc['kind']}/autoscaler", auto["image"]))
    return out


def test_the_images_component_reaches_every_pod_of_every_kustomization(stack, rendered):
    seen = set()
    for target, docs in rendered.items():
        images = _images(stack, docs)
        assert images, f"{target} runs no pod"
        for label, image in images:
            assert image in (
                f"{REGISTRY_IMAGE}:{VERSION}-cpu",
                f"{REGISTRY_IMAGE}:{VERSION}-gpu",
            ), f"{target} {label}: {image} does not come from the images component"
            seen.add((target, label))
    kinds = {label.split("/")[0] for _, label in seen}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Deployment", "Job"} <= kinds


def test_manifests_name_the_project_image_at_the_project_version(stack):
    for file, doc in stack.k8s:
        for label, image in _images(stack, [doc]):
            assert image in (f"moe-pretrain:{VERSION}-cpu", f"moe-pretrain:{VERSION}-gpu"), (
                f"{file} {label}: {image}"
            )


@pytest.mark.skipif(not shutil.which("kubectl"), reason="compares with kubectl's kustomize")
def test_the_fallback_renderer_agrees_with_kubectl(tmp_path, rendered):
    """Where kubectl is missing the tests render with kustomize_render.render_here; it must give
    what kubectl gives (the objects, their images and namespaces, the generated data keys)."""
    root = kustomize_render.prepare(K8S_DIR, tmp_path / "k8s", image_name=REGISTRY_IMAGE)
    for target in kustomize_render.TARGETS:
        ours = {_key(d): d for d in kustomize_render.render_here(Path(root) / target)}
        theirs = {_key(d): d for d in rendered[target]}
        assert ours.keys() == theirs.keys(), target
        for key, doc in theirs.items():
            if key[0] in ("Secret", "ConfigMap"):
                assert ours[key]["data"].keys() == doc["data"].keys(), key
            else:
                assert ours[key] == doc, key


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]
