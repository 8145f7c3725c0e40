"""The Kubernetes manifests, as written and as the kustomizations render them: core objects
validated against the Kubernetes OpenAPI schemas (``kubernetes-validate``), KubeRay objects
against KubeRay's own CRD schemas (v1.6.2, in kuberay/), every embedded pod template as a core
``PodTemplate``, and the security properties: credentials only from Secrets, nothing exposed,
unprivileged pods.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import kustomize_render
import pytest
import yaml

from pipeline.redaction import is_secret_key

K8S_VERSION = kubernetes_validate.latest_version()
CRON = re.compile(r"^(\S+\s+){4}\S+$")


# KubeRay's own CRDs (v1.6.2), as JSON schemas closed against unknown fields: see
# kuberay/derive.py for how they were made and kuberay/*.schema.json ($comment) for the source.
KUBERAY_DIR = Path(__file__).parent / "kuberay"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")


@functools.cache
def kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((KUBERAY_DIR / f"{kind.lower()}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def kuberay_errors(doc: dict) -> list[str]:
    errors = kuberay_validator(doc["kind"]).iter_errors(doc)
    return [f"{list(e.path)}: {e.message}" for e in errors]


def _is_ray(doc: dict) -> bool:
    return doc["apiVersion"].startswith("ray.io/")


def test_core_objects_validate_against_the_kubernetes_schemas(rendered_objects):
    core = {
        (d["kind"], d["metadata"]["name"]): (k, d) for k, d in rendered_objects if not _is_ray(d)
    }
    kinds = {kind for kind, _ in core}
    assert {"Deployment", "Service", "CronJob", "Job", "ConfigMap", "NetworkPolicy",
            "ServiceAccount", "Role", "RoleBinding", "Secret"} <= kinds  # fmt: skip
    for target, doc in core.values():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{target} {doc['kind']}: {e.message} at {list(e.path)}")


def test_kuberay_objects_validate_against_the_kuberay_crds(rendered_objects):
    found = set()
    for target, doc in rendered_objects:
        if _is_ray(doc):
            found.add(doc["kind"])
            assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
            messages = kuberay_errors(doc)
            assert not messages, f"{target} {doc['kind']}: {messages}"
    assert found == set(KUBERAY_KINDS)


def test_the_crd_schemas_reject_unknown_and_mistyped_fields(stack):
    """The schemas are closed where the CRDs are: a typo deep in a spec fails."""
    cluster = copy.deepcopy(stack.one("RayCluster"))
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in m for m in kuberay_errors(cluster))
    job = copy.deepcopy(stack.one("RayJob"))
    job["spec"]["activeDeadlineSeconds"] = "1d"
    assert any("activeDeadlineSeconds" in m for m in kuberay_errors(job))
    cron = copy.deepcopy(stack.one("RayCronJob"))
    cron["spec"]["concurrencyPolicy"] = "Forbid"  # not a RayCronJob field (KubeRay 1.6)
    assert any("concurrencyPolicy" in m for m in kuberay_errors(cron))
    for kind in KUBERAY_KINDS:
        assert "KubeRay v1.6" in kuberay_validator(kind).schema["$comment"]


def test_every_pod_template_validates_as_a_core_pod_template(stack):
    pods = [p for _, doc in stack.k8s for p in stack.pod_specs(doc)]
    assert len(pods) >= 7
    for label, template in pods:
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": "check"}, "template": template}  # fmt: skip
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{label}: {e.message} at {list(e.path)}")


def test_worker_groups_scale_within_their_bounds(stack):
    for group in stack.one("RayCluster")["spec"]["workerGroupSpecs"]:
        lo, n, hi = group["minReplicas"], group.get("replicas", 0), group["maxReplicas"]
        assert lo <= n <= hi and hi > 0, group["groupName"]


def _resources(k8s: Path, target: str) -> set[str]:
    """Manifest files (relative to infra/k8s) a kustomization applies, components included."""
    k = yaml.safe_load((k8s / target / "kustomization.yaml").read_text())
    out = set()
    for entry in k.get("resources", []) + k.get("components", []):
        path = (k8s / target / entry).resolve()
        rel = path.relative_to(k8s.resolve()).as_posix()
        out |= _resources(k8s, rel) if path.is_dir() else {rel}
    return out


def test_every_manifest_is_applied_by_exactly_one_kustomization(stack):
    k8s = stack.repo / "infra/k8s"
    applied = [f for target in kustomize_render.TARGETS for f in _resources(k8s, target)]
    assert sorted(applied) == sorted({file for file, _ in stack.k8s}), "a manifest outside"
    for target in kustomize_render.TARGETS:
        k = yaml.safe_load((k8s / target / "kustomization.yaml").read_text())
        assert k["namespace"] == "moe-pretrain", target
        assert [(k8s / target / c).resolve() for c in k["components"]] == [
            (k8s / "images").resolve()
        ], f"{target} must take its images from the images component"


def test_generators_have_examples_and_fixed_names(stack):
    k8s = stack.repo / "infra/k8s"
    for gen in stack.kustomization["secretGenerator"]:
        for path in gen.get("envs", []) + [f.split("=")[-1] for f in gen.get("files", [])]:
            assert (k8s / f"{path}.example").is_file(), f"no template for {path}"
    ignore = (k8s / "secrets/.gitignore").read_text().split()
    assert ignore[-3:] == ["*", "!.gitignore", "!*.example"] or {"*", "!*.example"} <= set(ignore)
    assert stack.kustomization["generatorOptions"]["disableNameSuffixHash"] is True


def _refs(stack):
    """(kind, name, key or None, where) for every Secret/ConfigMap a pod refers to."""
    for _, doc in stack.k8s:
        pods = stack.pod_specs(doc)
        extra = doc["spec"].get("autoscalerOptions", {}) if doc["kind"] == "RayCluster" else {}
        items = [(label, c) for label, t in pods for c in stack.containers(t)]
        items += [(f"{doc['kind']}/autoscaler", extra)] if extra else []
        for label, c in items:
            for src in c.get("envFrom", []):
                for kind in ("secretRef", "configMapRef"):
                    if kind in src:
                        yield kind[:-3], src[kind]["name"], None, label
            for env in c.get("env", []):
                for kind in ("secretKeyRef", "configMapKeyRef"):
                    ref = env.get("valueFrom", {}).get(kind)
                    if ref:
                        yield kind[:-6], ref["name"], ref["key"], label
        for label, t in pods:
            for vol in t.get("spec", {}).get("volumes", []):
                if "secret" in vol:
                    yield "secret", vol["secret"]["secretName"], None, label
                if "configMap" in vol:
                    yield "configMap", vol["configMap"]["name"], None, label


def test_every_secret_and_configmap_reference_resolves(stack):
    count = 0
    for kind, name, key, where in _refs(stack):
        count += 1
        known = stack.secret_keys if kind == "secret" else stack.configmap_data
        assert name in known, f"{where}: no {kind} named {name}"
        assert key is None or key in known[name], f"{where}: {kind} {name} has no key {key}"
    assert count >= 20


def test_credentials_come_only_from_secrets(stack):
    assert not stack.objects("Secret"), "Secret objects with data in git; use the generators"
    for label, container in [
        (label, c)
        for _, d in stack.k8s
        for label, t in stack.pod_specs(d)
        for c in stack.containers(t)
    ]:
        for name, source in stack.k8s_env(container).items():
            if is_secret_key(name):
                assert source.startswith("secret:"), f"{label}: {name} comes from {source}"
    for name, data in stack.configmap_data.items():
        assert not [k for k in data if is_secret_key(k)], f"ConfigMap {name} holds a credential"
        assert not any(re.search(r"://[^/\s@]+@", str(v)) for v in data.values()), name
    for path in (stack.repo / "infra/k8s/secrets").glob("*.example"):
        for line in path.read_text().splitlines():
            key, sep, value = (part.strip() for part in line.partition("="))
            if sep and not line.startswith("#"):
                assert key != "admin_password", f"{path.name}: the admin password comes from env"
                if is_secret_key(key) or re.search(r"://[^/\s@]+@", value):
                    assert "change-me" in value, f"{path.name}: {key} is not a placeholder"


def test_nothing_is_exposed_outside_the_cluster(stack):
    assert not stack.objects("Ingress")
    for svc in stack.objects("Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    head = stack.one("RayCluster")["spec"]["headGroupSpec"]
    assert "serviceType" not in head and not head.get("enableIngress", False)
    for _, doc in stack.k8s:
        for label, t in stack.pod_specs(doc):
            assert not t["spec"].get("hostNetwork"), label
            for c in stack.containers(t):
                assert not [p for p in c.get("ports", []) if "hostPort" in p], label


def test_pods_run_unprivileged_under_the_restricted_profile(stack):
    """What Pod Security's `restricted` level asks (the namespace warns on it), on every pod and
    on the autoscaler container KubeRay injects (its securityContext is autoscalerOptions')."""
    for _, doc in stack.k8s:
        for label, t in stack.pod_specs(doc):
            spec = t["spec"]
            assert spec.get("automountServiceAccountToken") is False, label
            ctx = spec.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True, label
            assert ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, label
            for c in stack.containers(t):
                ctx = c.get("securityContext", {})
                assert ctx.get("allowPrivilegeEscalation") is False, label
                assert ctx.get("capabilities", {}).get("drop") == ["ALL"], label
    auto = stack.one("RayCluster")["spec"]["autoscalerOptions"]["securityContext"]
    assert auto == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_everything_lives_in_one_namespace(stack, rendered_objects):
    (ns,) = stack.objects("Namespace")
    name = ns["metadata"]["name"]
    assert stack.kustomization["namespace"] == name
    for file, doc in [*stack.k8s, *rendered_objects]:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == name, f"{file} {doc['kind']}"


def _arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_mlflow_is_locked_down_and_reachable_where_clients_point(stack):
    (dep,) = [d for d in stack.objects("Deployment") if d["metadata"]["name"] == "mlflow"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["command"]
    assert args[:2] == ["mlflow", "server"] and _arg(args, "--app-name") == "basic-auth"
    port = int(_arg(args, "--port"))
    (svc,) = [s for s in stack.objects("Service") if s["metadata"]["name"] == "mlflow"]
    (sp,) = svc["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert container_ports[sp["targetPort"]] == port
    uri = urlsplit(stack.configmap_data["moe-pretrain-env"]["MLFLOW_TRACKING_URI"])
    assert (uri.hostname, uri.port) == (svc["metadata"]["name"], sp["port"])
    allowed = _arg(args, "--allowed-hosts").split(",")
    assert "*" not in allowed and uri.netloc in allowed and f"localhost:{sp['port']}" in allowed
    env = stack.k8s_env(c)
    config_dir = next(e["value"] for e in c["env"] if e["name"] == "MLFLOW_AUTH_CONFIG_PATH")
    mount = next(m for m in c["volumeMounts"] if config_dir.startswith(m["mountPath"] + "/"))
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert config_dir.rsplit("/", 1)[1] in stack.secret_keys[vol["secret"]["secretName"]]
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        assert env.get(name, "").startswith("secret:"), name
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"


def test_ray_nodes_use_token_auth_and_the_right_images(stack):
    cluster = stack.one("RayCluster")
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token"}  # the operator sets the token on every node
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    for label, t in stack.pod_specs(cluster):
        (c,) = t["spec"]["containers"]
        env = stack.k8s_env(c)
        assert "RAY_AUTH_TOKEN" not in env, f"{label}: the operator owns the Ray token"
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert bool(gpus) == label.endswith("gpu-workers"), label
        assert c["image"].endswith("-gpu" if gpus else "-cpu"), label


def test_runs_are_submitted_to_the_cluster_with_the_token(stack):
    cluster = stack.one("RayCluster")
    name = cluster["metadata"]["name"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    dashboard = next(p["containerPort"] for p in head["ports"] if p["name"] == "dashboard")
    job, cron = stack.one("RayJob")["spec"], stack.one("RayCronJob")["spec"]
    for spec in (job, cron["jobTemplate"]):
        assert spec["clusterSelector"] == {"ray.io/cluster": name}
        assert "rayClusterSpec" not in spec
        (sub,) = spec["submitterPodTemplate"]["spec"]["containers"]
        assert stack.k8s_env(sub)["RAY_AUTH_TOKEN"] == f"secret:{name}"
        assert stack.configmap_data["moe-pretrain-env"]["RAY_AUTH_MODE"] == "token"
    cronjob = stack.one("CronJob")
    assert CRON.match(cronjob["spec"]["schedule"]) and CRON.match(cron["schedule"])
    (c,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RAY_ADDRESS"] == f"http://{name}-head-svc:{dashboard}"
    assert stack.k8s_env(c)["RAY_AUTH_TOKEN"] == f"secret:{name}"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
