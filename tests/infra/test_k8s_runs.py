"""Runs on the shared RayCluster: a RayJob stops its Ray job by its deadline, runs do not overlap,
run objects do not pile up, and RayCronJob is the documented opt-in, CronJob the default.

KubeRay facts these rest on (ray-operator/controllers/ray/rayjob_controller.go, v1.6.2/v1.7.0):
with clusterSelector, a RayJob past activeDeadlineSeconds is marked Failed and its Ray job left
running, and neither ttlSecondsAfterFinished nor deletionStrategy is applied; RayCronJob
(raycronjob_types.go) has only schedule, jobTemplate, suspend (and timeZone from 1.7).
"""

from __future__ import annotations

import json
import re
import shlex

README = "infra/README.md"
# The head's one unit of this resource is what a run's driver needs; a second run waits and
# fails after Ray's RAY_JOB_START_TIMEOUT_SECONDS (15 min).
RUN_RESOURCE = "moe-pretrain-run"


def _job_specs(stack) -> list[tuple[str, dict]]:
    return [("RayJob", stack.one("RayJob")["spec"]),
            ("RayCronJob", stack.one("RayCronJob")["spec"]["jobTemplate"])]  # fmt: skip


def _timeout(argv: list[str]) -> tuple[int, int, list[str]]:
    """coreutils ``timeout --kill-after=K DURATION CMD...`` -> (DURATION, K, CMD)."""
    assert argv[0] == "timeout", f"the entrypoint has no deadline of its own: {argv}"
    kill_after, i = 0, 1
    while argv[i].startswith("-"):
        m = re.fullmatch(r"--kill-after=(\d+)", argv[i])
        assert m, f"unexpected timeout option {argv[i]}"
        kill_after, i = int(m[1]), i + 1
    return int(argv[i]), kill_after, argv[i + 1 :]


def test_the_ray_job_stops_before_kuberay_gives_up_on_it(stack):
    for kind, spec in _job_specs(stack):
        assert spec["clusterSelector"], kind
        duration, kill_after, command = _timeout(shlex.split(spec["entrypoint"]))
        assert kill_after > 0, f"{kind}: no SIGKILL after the SIGTERM"
        assert duration + kill_after < spec["activeDeadlineSeconds"], kind
        assert command[:2] == ["moe-pretrain", "run"], kind


def test_at_most_one_run_at_a_time_on_the_cluster(stack):
    head = stack.one("RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]
    # KubeRay writes rayStartParams into the head's shell command as --resources=VALUE.
    (value,) = shlex.split(head["resources"])
    provided = json.loads(value)
    assert provided == {RUN_RESOURCE: 1}
    for group in stack.one("RayCluster")["spec"]["workerGroupSpecs"]:
        assert "resources" not in group["rayStartParams"], group["groupName"]
    for kind, spec in _job_specs(stack):
        assert json.loads(spec["entrypointResources"]) == {RUN_RESOURCE: 1}, kind
    cron = stack.one("CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"


def test_run_objects_do_not_pile_up(stack):
    job = stack.one("RayJob")
    assert "generateName" not in job["metadata"], "kustomize needs a name; one run object at a time"
    assert job["metadata"]["name"]
    for kind, spec in _job_specs(stack):
        # Dead fields in clusterSelector mode; they would only mislead.
        assert "ttlSecondsAfterFinished" not in spec and "deletionStrategy" not in spec, kind
    cron = stack.one("CronJob")["spec"]
    assert cron["successfulJobsHistoryLimit"] <= 3 and cron["failedJobsHistoryLimit"] <= 3
    text = (stack.repo / README).read_text()
    assert "ray.io/cronjob-name=moe-pretrain-nightly" in text, "no pruning recipe for RayCronJob"


def test_raycronjob_is_opt_in_and_its_prerequisites_are_checked(stack):
    text = (stack.repo / README).read_text()
    header = (stack.repo / "infra/k8s/schedule-raycronjob/raycronjob.yaml").read_text()
    for where in (text, header):
        assert "1.6.0" in where and "RayCronJob" in where and "feature gate" in where
    # The bring-up checks the operator's version and gate before applying it.
    bring_up = text[text.index("## Kubernetes: KubeRay") :]
    check = bring_up.index("--feature-gates")
    assert check < bring_up.index("kubectl apply -k infra/k8s/schedule-raycronjob")
    assert bring_up.index("kubectl apply -k infra/k8s/schedule ") < check, "CronJob first"
