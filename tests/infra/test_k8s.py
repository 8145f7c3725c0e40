"""The Kubernetes manifests: core objects validated against the Kubernetes OpenAPI schemas
(``kubernetes-validate``), KubeRay objects against the fields of KubeRay's v1 CRDs that these
manifests use (with every embedded pod template validated as a core ``PodTemplate``), and
the security properties: credentials only from Secrets, nothing exposed, unprivileged pods.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest

from jobs.security import is_secret_key

K8S_VERSION = kubernetes_validate.latest_version()
RUN_FILES = {"rayjob.yaml", "raycronjob.yaml", "cronjob.yaml"}  # applied on their own
CRON = re.compile(r"^(\S+\s+){4}\S+$")


def _obj(props: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": False}  # fmt: skip


# The KubeRay v1 CRD fields (ray-operator/apis/ray/v1/*_types.go, KubeRay 1.1-1.6) that matter
# here, closed with additionalProperties: false so a typo or a field of another version fails.
# Pod templates are checked separately, against the core schema.
_POD = {"type": "object"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_COUNT = {"type": "integer", "minimum": 0}
_HEAD = _obj(
    {"rayStartParams": _STR_MAP, "template": _POD, "serviceType": {"type": "string"},
     "headService": {"type": "object"}, "enableIngress": {"type": "boolean"}},
    ("rayStartParams", "template"),
)  # fmt: skip
_WORKER = _obj(
    {"groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
     "replicas": _COUNT, "minReplicas": _COUNT, "maxReplicas": _COUNT, "numOfHosts": _COUNT,
     "rayStartParams": _STR_MAP, "template": _POD, "scaleStrategy": {"type": "object"},
     "suspend": {"type": "boolean"}, "idleTimeoutSeconds": _COUNT},
    ("groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"),
)  # fmt: skip
_AUTOSCALER = _obj(
    {"env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
     "envFrom": {"type": "array"}, "resources": {"type": "object"},
     "idleTimeoutSeconds": _COUNT, "image": {"type": "string"},
     "imagePullPolicy": {"type": "string"}, "securityContext": {"type": "object"},
     "volumeMounts": {"type": "array"}, "version": {"enum": ["v1", "v2"]},
     "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}}
)  # fmt: skip
_CLUSTER = _obj(
    {"headGroupSpec": _HEAD, "workerGroupSpecs": {"type": "array", "items": _WORKER},
     "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
     "autoscalerOptions": _AUTOSCALER, "headServiceAnnotations": _STR_MAP,
     "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
     "authOptions": _obj({"mode": {"enum": ["disabled", "token"]}}),
     "gcsFaultToleranceOptions": {"type": "object"}, "upgradeStrategy": {"type": "object"}},
    ("headGroupSpec",),
)  # fmt: skip
_JOB = _obj(
    {"entrypoint": {"type": "string", "minLength": 1}, "clusterSelector": _STR_MAP,
     "rayClusterSpec": _CLUSTER, "submitterPodTemplate": _POD,
     "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
     "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": _COUNT,
     "runtimeEnvYAML": {"type": "string"}, "suspend": {"type": "boolean"},
     "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
     "backoffLimit": _COUNT, "entrypointNumCpus": {"type": "number"},
     "entrypointNumGpus": {"type": "number"}, "entrypointResources": {"type": "string"},
     "jobId": {"type": "string"}, "metadata": _STR_MAP, "managedBy": {"type": "string"},
     "deletionStrategy": {"type": "object"}, "submitterConfig": {"type": "object"}},
    ("entrypoint",),
)  # fmt: skip
_CRON_JOB = _obj(
    {"schedule": {"type": "string", "pattern": CRON.pattern}, "jobTemplate": _JOB,
     "suspend": {"type": "boolean"}},
    ("schedule", "jobTemplate"),
)  # fmt: skip
KUBERAY = {"RayCluster": _CLUSTER, "RayJob": _JOB, "RayCronJob": _CRON_JOB}
_META = {"type": "object", "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}]}


def _kuberay_schema(kind: str) -> dict:
    return _obj(
        {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": _META,
         "spec": KUBERAY[kind]},
        ("apiVersion", "kind", "metadata", "spec"),
    )  # fmt: skip


def _is_ray(doc: dict) -> bool:
    return doc["apiVersion"].startswith("ray.io/")


def test_core_objects_validate_against_the_kubernetes_schemas(stack):
    core = [(f, d) for f, d in stack.k8s if not _is_ray(d)]
    kinds = {d["kind"] for _, d in core}
    assert {"Deployment", "Service", "CronJob", "Job", "ConfigMap", "NetworkPolicy"} <= kinds
    for file, doc in core:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{file} {doc['kind']}: {e.message} at {list(e.path)}")


def test_kuberay_objects_match_the_crd_fields(stack):
    found = set()
    for file, doc in stack.k8s:
        if _is_ray(doc):
            found.add(doc["kind"])
            errors = jsonschema.Draft202012Validator(_kuberay_schema(doc["kind"])).iter_errors(doc)
            messages = [f"{list(e.path)}: {e.message}" for e in errors]
            assert not messages, f"{file} {doc['kind']}: {messages}"
    assert found == set(KUBERAY)


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


def test_kustomization_covers_every_file_and_generators_have_examples(stack):
    k8s = stack.repo / "infra/k8s"
    resources = set(stack.kustomization["resources"])
    on_disk = {p.name for p in k8s.glob("*.yaml")} - {"kustomization.yaml"}
    assert resources | RUN_FILES == on_disk
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


def test_pods_run_unprivileged(stack):
    for _, doc in stack.k8s:
        for label, t in stack.pod_specs(doc):
            spec = t["spec"]
            assert spec.get("automountServiceAccountToken") is False, label
            assert spec.get("securityContext", {}).get("runAsNonRoot") is True, label
            for c in stack.containers(t):
                ctx = c.get("securityContext", {})
                assert ctx.get("allowPrivilegeEscalation") is False, label
                assert ctx.get("capabilities", {}).get("drop") == ["ALL"], label


def test_everything_lives_in_one_namespace(stack):
    (ns,) = stack.objects("Namespace")
    name = ns["metadata"]["name"]
    assert stack.kustomization["namespace"] == name
    for file, doc in stack.k8s:
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
        assert c["image"].endswith(":gpu" if gpus else ":cpu"), label


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
