"""Run the pipeline as a Ray job: submit, status, logs, stop (Ray Jobs SDK).

The job runs ``python -m jobs.service run`` from a copy of the working
directory (``runtime_env.working_dir``, minus ``cluster.excludes``), with the
config tree shipped inline, so a config file does not have to exist on the
cluster. No credential is shipped (``build_submission``): the entrypoint,
runtime_env and metadata are visible to anyone who can read the dashboard;
give the cluster its secrets through its own environment.

Auth: Ray 2.52+ clusters in token mode want ``Authorization: Bearer <token>``
on every dashboard request. The SDK adds it only when this process runs in
token mode too, so the token is sent explicitly, found where Ray keeps it
(``jobs.auth.ray_auth_token``: ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from jobs.auth import ray_auth_headers
from jobs.errors import JobError
from jobs.service.config import ClusterConfig
from jobs.service.lineage import GIT_ENV, git_commit
from pipeline.redaction import IN_VALUE, redact_uri, split_secrets, strip_uri_credentials

SUBMISSION_ENV = "MOE_PRETRAIN_SUBMISSION_ID"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobInfo:
    submission_id: str
    status: str
    message: str
    metadata: dict[str, str]
    start_time: int | None
    end_time: int | None


def resolve_address(explicit: str | None, cluster: ClusterConfig) -> str:
    """``--address`` > ``cluster.address`` > ``$RAY_ADDRESS`` if it is a dashboard URL.

    Never auto-detected: a cluster some ``ray start`` left on this machine is
    not a place to send work by accident.
    """
    env = os.environ.get("RAY_ADDRESS", "")
    address = explicit or cluster.address or (env if env.startswith("http") else None)
    if not address:
        raise JobError("no cluster address: pass --address http://HEAD:8265 or set cluster.address")
    if not address.startswith(("http://", "https://")):
        raise JobError(
            f"cluster address must be http(s)://HEAD:PORT (the dashboard), got {redact_uri(address)}"
        )
    return address.rstrip("/")


class DuplicateSubmission(JobError):
    """The cluster already has a job with this submission id."""


@contextmanager
def _errors(what: str):
    """Ray's SDK errors as one-line ``JobError``s naming what failed."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except JobError:
        raise
    except AuthenticationError:
        raise JobError(
            f"{what}: the cluster refused our credentials; set RAY_AUTH_TOKEN to its token, "
            f"or RAY_AUTH_TOKEN_PATH to its token file (default ~/.ray/auth_token)"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobError(f"{what}: {_first_line(e)}") from None


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    headers = ray_auth_headers() or None
    with _errors(f"Ray dashboard at {address}"):
        return JobSubmissionClient(address, headers=headers)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def project_requirements() -> list[str]:
    """This package's runtime dependencies, as installed (extras left out)."""
    try:
        reqs = metadata.requires("moe-pretrain") or []
    except metadata.PackageNotFoundError:
        return []
    return [r for r in reqs if "extra ==" not in r]


class Submission(NamedTuple):
    """What goes to the job server, all of it readable on the dashboard: no credential."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    withheld: list[str]  # dotted keys; `` (credentials in the value)`` where only stripped


def build_submission(
    tree: Mapping[str, Any],
    cluster: ClusterConfig,
    submission_id: str | None = None,
    metadata_: Mapping[str, str] | None = None,
) -> Submission:
    """The job for ``run`` with the config ``tree``, stripped by key and by value.

    A credential-named key (``data.s3.secret``, ``cluster.env_vars.AWS_SECRET_ACCESS_KEY``) is
    left out; a value with credentials in it (``https://user:pw@host``, ``?sig=``, a
    ``git+https://token@...`` in ``cluster.pip``, an inherited ``$MLFLOW_TRACKING_URI``) is
    shipped without them. ``submit`` and the scheduler both submit what this returns.
    """
    shipped, withheld = split_secrets(tree)
    kept, more = split_secrets(cluster.model_dump(), "cluster")
    env, inherited = _runtime_env(ClusterConfig.model_validate(kept), submission_id)
    env, rest = split_secrets(env, "runtime_env")  # this package's own requirements, say
    meta, in_meta = split_secrets({k: str(v) for k, v in (metadata_ or {}).items()}, "metadata")
    names = withheld + more + inherited + rest + in_meta
    return Submission(_entrypoint(shipped), env, meta, list(dict.fromkeys(names)))


def withheld_lines(withheld: list[str]) -> list[str]:
    """What the CLI and the scheduler's log say about ``Submission.withheld`` (names only)."""
    lines = [
        f"{name.removesuffix(IN_VALUE)} shipped without the credentials in its value"
        if name.endswith(IN_VALUE)
        else f"{name} not shipped to the cluster (a credential)"
        for name in withheld
    ]
    if lines:
        lines.append("the job gets its credentials from the cluster's own environment")
    return lines


def runtime_env(cluster: ClusterConfig, submission_id: str | None) -> dict[str, Any]:
    """The job's ``runtime_env`` (what ``build_submission`` ships: no credential)."""
    return build_submission({}, cluster, submission_id).runtime_env


def _runtime_env(cluster: ClusterConfig, submission_id: str | None) -> tuple[dict, list[str]]:
    work = Path(cluster.working_dir).resolve()
    if not work.is_dir():
        raise JobError(f"cluster.working_dir is not a folder: {cluster.working_dir}")
    env_vars = {GIT_ENV: git_commit(work), **cluster.env_vars}
    if submission_id:
        env_vars[SUBMISSION_ENV] = submission_id
    withheld = []
    inherited = os.environ.get("MLFLOW_TRACKING_URI")
    if inherited and "MLFLOW_TRACKING_URI" not in env_vars:
        env_vars["MLFLOW_TRACKING_URI"] = strip_uri_credentials(inherited)
        if env_vars["MLFLOW_TRACKING_URI"] != inherited:
            withheld.append(f"$MLFLOW_TRACKING_URI{IN_VALUE}")
    env: dict[str, Any] = {
        "working_dir": str(work),
        "excludes": list(cluster.excludes),
        "env_vars": env_vars,
    }
    pip = (project_requirements() if cluster.install_project_deps else []) + list(cluster.pip)
    if pip:
        env["pip"] = pip
    return env, withheld


def _entrypoint(tree: Mapping[str, Any]) -> str:
    return f"python -m jobs.service run --config-json {shlex.quote(json.dumps(tree))}"


def submit_run(
    tree: Mapping[str, Any],
    cluster: ClusterConfig,
    address: str,
    submission_id: str | None = None,
    metadata_: Mapping[str, str] | None = None,
) -> tuple[str, list[str]]:
    """Submit ``build_submission(...)``; returns (submission id, what was withheld).

    A ``submission_id`` that the cluster already knows raises ``DuplicateSubmission``:
    that is how a repeated trigger of the same scheduled run is refused.
    """
    job = build_submission(tree, cluster, submission_id, metadata_)
    c = client(address)
    with _errors(f"submit to {address}"):
        try:
            sid = c.submit_job(
                entrypoint=job.entrypoint,
                submission_id=submission_id,
                runtime_env=job.runtime_env,
                metadata=job.metadata,
                entrypoint_num_cpus=cluster.entrypoint_num_cpus or None,
            )
        except RuntimeError as e:
            # The job server answers 500 with a traceback that ends in this sentence.
            if submission_id and "already exists" in str(e):
                raise DuplicateSubmission(f"submission id {submission_id} already exists") from None
            raise
    return sid, job.withheld


def job_info(address: str, submission_id: str) -> JobInfo:
    with _errors(f"job {submission_id}"):
        info = client(address).get_job_info(submission_id)
    return JobInfo(
        submission_id=submission_id,
        status=str(info.status.value if hasattr(info.status, "value") else info.status),
        message=info.message or "",
        metadata=dict(info.metadata or {}),
        start_time=info.start_time,
        end_time=info.end_time,
    )


def job_logs(address: str, submission_id: str) -> str:
    with _errors(f"job {submission_id}"):
        return client(address).get_job_logs(submission_id)


def follow_logs(address: str, submission_id: str, write=print) -> None:
    """Stream the job's logs until it ends (the SDK's websocket tail)."""

    async def tail() -> None:
        async for lines in client(address).tail_job_logs(submission_id):
            write(lines)

    with _errors(f"job {submission_id}"):
        asyncio.run(tail())


def stop_job(address: str, submission_id: str) -> bool:
    with _errors(f"job {submission_id}"):
        return client(address).stop_job(submission_id)
