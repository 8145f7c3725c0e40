"""Pod resources a Ray deployment needs beyond CPU and memory: a memory-backed /dev/shm big
enough for Ray's object store on every Ray pod, and ephemeral-storage requests and limits on
every container (Ray spills objects and writes logs under /tmp)."""

from __future__ import annotations

import re

# Ray's object store takes this share of the node's memory by default
# (ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION); /dev/shm must hold it, or Ray
# falls back to a disk-backed store.
from ray._private.ray_constants import DEFAULT_OBJECT_STORE_MEMORY_PROPORTION

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}  # fmt: skip


def parse_quantity(value: str) -> int:
    """A Kubernetes byte quantity (``512Mi``, ``20Gi``, ``1G``) in bytes."""
    m = re.fullmatch(r"(\d+)([kMGT]i?|)", str(value))
    assert m, f"not a byte quantity: {value!r}"
    return int(m[1]) * _UNITS[m[2]]


def test_every_ray_pod_has_a_dev_shm_for_the_object_store(stack):
    for label, template in stack.pod_specs(stack.one("RayCluster")):
        spec = template["spec"]
        (ray,) = [c for c in spec["containers"] if c["name"].startswith("ray-")]
        mounts = {m["mountPath"]: m["name"] for m in ray.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{label}: no /dev/shm volume"
        (vol,) = [v for v in spec["volumes"] if v["name"] == mounts["/dev/shm"]]
        assert vol["emptyDir"]["medium"] == "Memory", label
        shm = parse_quantity(vol["emptyDir"]["sizeLimit"])
        memory = parse_quantity(ray["resources"]["limits"]["memory"])
        assert shm >= DEFAULT_OBJECT_STORE_MEMORY_PROPORTION * memory, f"{label}: {shm} B"
        assert shm < memory, f"{label}: /dev/shm counts against the memory limit"


def test_every_container_requests_and_limits_ephemeral_storage(stack):
    containers = [
        (label, c)
        for _, doc in stack.k8s
        for label, t in stack.pod_specs(doc)
        for c in stack.containers(t)
    ]
    containers.append(("autoscaler", stack.one("RayCluster")["spec"]["autoscalerOptions"]))
    assert len(containers) >= 9
    for label, c in containers:
        res = c["resources"]
        request = parse_quantity(res["requests"]["ephemeral-storage"])
        limit = parse_quantity(res["limits"]["ephemeral-storage"])
        assert 0 < request <= limit, label
        assert res["requests"]["memory"] and res["limits"]["memory"], label
