"""Create (or re-password) the pipeline's MLflow user, as the admin, through the auth REST API.

Run once after the MLflow server is up (compose service / Kubernetes Job
``mlflow-bootstrap``). The pipeline then logs as a plain user: it owns (MANAGE)
the experiments and models it creates, while everyone else gets the server's
``default_permission`` (READ). Reads only environment variables:

- ``MLFLOW_TRACKING_URI``: the server.
- ``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD``: the admin (same
  variables the server bootstraps its admin from).
- ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``: the user to create.

Re-running is safe: an existing user gets the password from the environment, so
the Secret stays the single source of truth when it is rotated.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request

USERS = "/api/2.0/mlflow/users"


def _call(uri: str, admin: tuple[str, str], method: str, path: str, body: dict) -> int:
    token = base64.b64encode(f"{admin[0]}:{admin[1]}".encode()).decode()
    req = urllib.request.Request(
        f"{uri.rstrip('/')}{path}",
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def ensure_user(uri: str, admin: tuple[str, str], username: str, password: str) -> str:
    """``"created"`` or ``"updated"``; raises ``RuntimeError`` naming the HTTP status otherwise."""
    body = {"username": username, "password": password}
    status = _call(uri, admin, "POST", f"{USERS}/create", body)
    if status == 200:
        return "created"
    if status == 400:  # RESOURCE_ALREADY_EXISTS
        status = _call(uri, admin, "PATCH", f"{USERS}/update-password", body)
        if status == 200:
            return "updated"
    raise RuntimeError(f"creating MLflow user {username!r} at {uri} failed: HTTP {status}")


def main() -> int:
    env = os.environ
    needed = [
        "MLFLOW_TRACKING_URI",
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ]
    missing = [name for name in needed if not env.get(name)]
    if missing:
        print(f"error: missing environment variables: {', '.join(missing)}", file=sys.stderr)
        return 2
    admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    user = env["MLFLOW_TRACKING_USERNAME"]
    try:
        outcome = ensure_user(
            env["MLFLOW_TRACKING_URI"], admin, user, env["MLFLOW_TRACKING_PASSWORD"]
        )
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MLflow user {user!r} {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
