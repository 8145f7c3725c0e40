"""The NetworkPolicies as the cluster enforces them: each pod that the kustomizations create (with
the labels KubeRay adds to Ray pods) may reach what it needs and nothing else; no pod reaches
the cloud metadata endpoint. Connections are checked with the semantics of
networking.k8s.io/v1 (policies selecting a pod isolate it; allowed = the union of their rules).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

METADATA = ["169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254"]
OBJECT_STORE = "52.216.8.1"  # an S3 address; any public address stands in for it
POSTGRES = "10.20.0.5"
API_SERVER = "10.0.0.1"
CLUSTER_DNS = "10.96.0.10"


@dataclass
class Pod:
    label: str
    labels: dict[str, str]
    has_s3_keys: bool


def _pods(stack, rendered_objects) -> list[Pod]:
    out = []
    seen = set()
    for _, doc in rendered_objects:
        for label, template in stack.pod_specs(doc):
            if label in seen:
                continue
            seen.add(label)
            labels = dict(template.get("metadata", {}).get("labels", {}))
            if doc["kind"] == "RayCluster":  # common.labelPod, KubeRay v1.6.2
                head = label.endswith("/head")
                labels |= {"ray.io/is-ray-node": "yes",
                           "ray.io/cluster": doc["metadata"]["name"],
                           "ray.io/node-type": "head" if head else "worker"}  # fmt: skip
            env = {k: v for c in stack.containers(template) for k, v in stack.k8s_env(c).items()}
            out.append(Pod(label, labels, "AWS_SECRET_ACCESS_KEY" in env))
    return out


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict, dest) -> bool:
    if "ipBlock" in peer:
        if not isinstance(dest, str):
            return False
        ip, block = ipaddress.ip_address(dest), peer["ipBlock"]
        net = ipaddress.ip_network(block["cidr"])
        return (ip.version == net.version and ip in net
                and not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])))  # fmt: skip
    assert "namespaceSelector" not in peer, "cross-namespace egress is not expected"
    return isinstance(dest, Pod) and _selects(peer["podSelector"], dest.labels)


def allowed(policies, src: Pod, dest, port: int, protocol: str = "TCP") -> bool:
    selecting = [p for p in policies if "Egress" in p["spec"]["policyTypes"]
                 and _selects(p["spec"]["podSelector"], src.labels)]  # fmt: skip
    assert selecting, f"{src.label} is not egress-isolated: every destination is open"
    for policy in selecting:
        for rule in policy["spec"].get("egress", []):
            ports = rule.get("ports")
            if ports and not any(p["port"] == port and p.get("protocol", "TCP") == protocol
                                 for p in ports):  # fmt: skip
                continue
            if "to" not in rule or any(_peer_matches(peer, dest) for peer in rule["to"]):
                return True
    return False


@pytest.fixture(scope="module")
def net(stack, rendered, rendered_objects):
    policies = [d for d in rendered["."] if d["kind"] == "NetworkPolicy"]
    pods = _pods(stack, rendered_objects)
    return policies, pods


def _one(pods, suffix: str) -> Pod:
    (pod,) = [p for p in pods if p.label.endswith(suffix)]
    return pod


def test_no_pod_reaches_the_cloud_metadata_endpoint(net):
    policies, pods = net
    assert len(pods) >= 8
    for pod in pods:
        for ip in METADATA:
            for port in (80, 443):
                assert not allowed(policies, pod, ip, port), f"{pod.label} -> {ip}:{port}"


def test_every_pod_resolves_names_and_reaches_mlflow(net):
    policies, pods = net
    mlflow = _one(pods, "Deployment/mlflow")
    for pod in pods:
        assert allowed(policies, pod, CLUSTER_DNS, 53, "UDP"), pod.label
        assert allowed(policies, pod, CLUSTER_DNS, 53, "TCP"), pod.label
        assert allowed(policies, pod, mlflow, 5000), pod.label
        assert not allowed(policies, pod, mlflow, 22), pod.label


def test_ray_nodes_reach_each_other_on_every_port(net):
    policies, pods = net
    ray = [p for p in pods if p.labels.get("ray.io/is-ray-node") == "yes"]
    assert len(ray) == 3
    for src in ray:
        for dest in ray:
            for port in (6379, 8265, 10002, 19999, 52365):
                assert allowed(policies, src, dest, port), f"{src.label} -> {dest.label}:{port}"


def test_submitters_reach_the_jobs_api_only(net):
    policies, pods = net
    head, worker = _one(pods, "RayCluster/moe-pretrain/head"), _one(pods, "/cpu-workers")
    submitters = [
        p for p in pods if p.label.endswith("/submitter") or p.label.startswith("CronJob")
    ]
    assert len(submitters) == 3
    for pod in submitters:
        assert allowed(policies, pod, head, 8265), pod.label
        assert not allowed(policies, pod, head, 6379), pod.label
        assert not allowed(policies, pod, worker, 10002), pod.label
        assert not allowed(policies, pod, OBJECT_STORE, 443), pod.label


def test_only_holders_of_object_store_keys_reach_it(net):
    policies, pods = net
    holders = [p for p in pods if p.has_s3_keys]
    assert {p.label.split("/")[0] for p in holders} == {"RayCluster", "Deployment"}
    for pod in pods:
        reach = allowed(policies, pod, OBJECT_STORE, 443)
        if pod.labels.get("ray.io/node-type") != "head":  # the head also reaches the API on 443
            assert reach == pod.has_s3_keys, pod.label
        assert not allowed(policies, pod, OBJECT_STORE, 80), pod.label


def test_mlflow_reaches_postgres_and_the_head_reaches_the_kubernetes_api(net):
    policies, pods = net
    for pod in pods:
        is_mlflow = pod.labels.get("app.kubernetes.io/name") == "mlflow"
        assert allowed(policies, pod, POSTGRES, 5432) == is_mlflow, pod.label
        is_head = pod.labels.get("ray.io/node-type") == "head"
        assert allowed(policies, pod, API_SERVER, 6443) == is_head, pod.label
