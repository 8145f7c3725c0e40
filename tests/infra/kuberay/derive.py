"""Derive the JSON schemas in this folder from KubeRay's CRDs (run once per KubeRay upgrade;
the tests only read the result and download nothing).

    git clone https://github.com/ray-project/kuberay && cd kuberay && git checkout v1.6.2
    python tests/infra/kuberay/derive.py kuberay/.git v1.6.2

Each CRD's ``openAPIV3Schema`` (version v1) becomes a JSON schema: descriptions dropped (they are
most of the size), and every object that lists ``properties`` closed with
``additionalProperties: false`` unless the CRD preserves unknown fields there, which is how the
API server prunes (or, with ``kubectl apply --validate=strict``, rejects) unknown fields.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CRDS = {
    "RayCluster": "ray-operator/config/crd/bases/ray.io_rayclusters.yaml",
    "RayJob": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml",
    "RayCronJob": "ray-operator/config/crd/bases/ray.io_raycronjobs.yaml",
}
OUT = Path(__file__).resolve().parent


def close(node):
    if isinstance(node, list):
        return [close(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: close(v) for k, v in node.items() if k != "description"}
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def derive(crd: dict) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = close(version["schema"]["openAPIV3Schema"])
    # The API server owns metadata and status; check what a manifest may set.
    schema["properties"]["metadata"] = {"type": "object"}
    schema["properties"].pop("status", None)
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/v1"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def main(kuberay: str, ref: str) -> None:
    commit = subprocess.check_output(
        ["git", f"--git-dir={kuberay}", "rev-parse", ref], text=True
    ).strip()
    for kind, path in CRDS.items():
        text = subprocess.check_output(
            ["git", f"--git-dir={kuberay}", "show", f"{ref}:{path}"], text=True
        )
        schema = derive(yaml.safe_load(text))
        schema["$comment"] = f"KubeRay {ref} ({commit}) {path}, derived by derive.py"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        (OUT / f"{kind.lower()}.schema.json").write_text(json.dumps(schema, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
