"""Ray's Jobs API with token auth (the head the compose stack and the manifests run):
no token, no entry; ``jobs.auth.ray_auth_headers`` is all a client needs."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest

from jobs.auth import ray_auth_headers

pytestmark = pytest.mark.slow


def _status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_jobs_api_wants_the_token(ray_cluster):
    url = f"{ray_cluster.address}/api/jobs/"
    assert _status(url, {}) == 401
    assert _status(url, ray_auth_headers({"RAY_AUTH_TOKEN": "not-the-token"})) == 403
    assert _status(url, ray_auth_headers({"RAY_AUTH_TOKEN": ray_cluster.token})) == 200


def test_the_sdk_client_authenticates_with_the_headers_alone(ray_cluster, monkeypatch):
    """Without RAY_AUTH_MODE in the client's environment, as on a laptop or in a CronJob pod."""
    from ray.job_submission import JobSubmissionClient

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    headers = ray_auth_headers({"RAY_AUTH_TOKEN": ray_cluster.token})
    assert isinstance(JobSubmissionClient(ray_cluster.address, headers=headers).list_jobs(), list)


def test_the_compose_healthcheck_needs_no_token(ray_cluster, stack):
    """ray-head's healthcheck runs without the token, so the path must be one Ray leaves open
    (as KubeRay's probes need too); it must still report the GCS."""
    test = stack.service("ray-head")["healthcheck"]["test"]
    (path,) = re.findall(r"http://localhost:\d+(/[\w/]+)", test[-1])
    with urllib.request.urlopen(f"{ray_cluster.address}{path}", timeout=30) as r:
        assert r.status == 200 and r.read().decode().strip() == "success"
