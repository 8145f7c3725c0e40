"""The autoscaler can work: the head pod as KubeRay builds it gives the injected ``autoscaler``
container a service-account token at the path Ray's autoscaler reads, for an account bound to
exactly the Role KubeRay's autoscaler needs; no other container or pod gets a token.

KubeRay's side is read from its source (ray-operator/controllers/ray/common/pod.go, rbac.go,
v1.6.2): with enableInTreeAutoscaling it sets the head pod's serviceAccountName to the
template's (else the cluster's name), appends an ``autoscaler`` container and merges
autoscalerOptions' volumeMounts into it; it creates a Role and RoleBinding named after the
cluster unless they exist.
"""

from __future__ import annotations

import copy

from ray.autoscaler._private.kuberay import node_provider

# common.BuildRole, KubeRay v1.6.2: what the autoscaler does through the Kubernetes API.
KUBERAY_AUTOSCALER_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["pods/resize"], "verbs": ["patch"]},
    {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get", "patch"]},
]
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def head_pod_as_kuberay_builds_it(cluster: dict) -> dict:
    """The head pod spec after KubeRay's BuildPod/mergeAutoscalerOverrides (the parts that matter
    for credentials)."""
    spec = cluster["spec"]
    pod = copy.deepcopy(spec["headGroupSpec"]["template"]["spec"])
    pod["serviceAccountName"] = pod.get("serviceAccountName") or cluster["metadata"]["name"]
    options = spec.get("autoscalerOptions", {})
    pod["containers"].append(
        {"name": "autoscaler", "volumeMounts": list(options.get("volumeMounts", []))}
    )
    return pod


def _mounted_files(pod: dict, container: dict) -> dict[str, dict]:
    """Absolute path -> projected source, for every file a container sees from a projected
    volume (or the kubelet's automount)."""
    out = {}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        projected = volumes[mount["name"]].get("projected")
        for source in projected["sources"] if projected else []:
            for kind, item in source.items():
                paths = [item["path"]] if kind == "serviceAccountToken" else []
                paths += [i["path"] for i in item.get("items", [])]
                out.update({f"{mount['mountPath']}/{p}": {kind: item} for p in paths})
    if pod.get("automountServiceAccountToken", True):
        out.update({f"{TOKEN_DIR}/token": {"automount": True}})
    return out


def test_the_autoscaler_container_gets_the_token_where_ray_reads_it(stack):
    cluster = stack.one("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    pod = head_pod_as_kuberay_builds_it(cluster)
    ray_head, autoscaler = pod["containers"][0], pod["containers"][-1]
    files = _mounted_files(pod, autoscaler)
    token = files[node_provider.IN_CLUSTER_TOKEN_PATH]["serviceAccountToken"]
    # The kubelet's own request: the API server extends it and rotates the file.
    assert token["expirationSeconds"] == 3607 and "audience" not in token
    ca = files[node_provider.IN_CLUSTER_CA_CERT_PATH]["configMap"]
    assert ca["name"] == "kube-root-ca.crt"
    assert not _mounted_files(pod, ray_head), "the Ray container (drivers) must hold no token"


def test_the_account_is_bound_to_exactly_the_role_kuberay_gives_its_autoscaler(rendered):
    base = rendered["."]
    by_kind = {}
    for doc in base:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    (cluster,) = by_kind["RayCluster"].values()
    name = cluster["metadata"]["name"]
    account = head_pod_as_kuberay_builds_it(cluster)["serviceAccountName"]
    assert account != "default" and account in by_kind["ServiceAccount"]
    assert by_kind["ServiceAccount"][account]["automountServiceAccountToken"] is False
    # Named as the operator names its own, so it adds no second, operator-owned set.
    binding = by_kind["RoleBinding"][name]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": cluster["metadata"]["namespace"]}
    ]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": name}  # fmt: skip
    assert by_kind["Role"][name]["rules"] == KUBERAY_AUTOSCALER_RULES
    assert "ClusterRole" not in by_kind and "ClusterRoleBinding" not in by_kind
    assert set(by_kind["RoleBinding"]) == {name}, "one binding, to the autoscaler's account"


def test_no_other_pod_gets_a_token_or_the_autoscalers_account(stack, rendered_objects):
    cluster = stack.one("RayCluster")
    account = cluster["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
    head = cluster["spec"]["headGroupSpec"]["template"]
    for target, doc in rendered_objects:
        for label, template in stack.pod_specs(doc):
            spec = template["spec"]
            assert spec["automountServiceAccountToken"] is False, f"{target} {label}"
            if template is not head and not label.endswith("/head"):
                assert spec.get("serviceAccountName") in (None, "default"), f"{target} {label}"
                for c in stack.containers(template):
                    assert not _mounted_files(spec, c), f"{target} {label}: a token"
    assert account
