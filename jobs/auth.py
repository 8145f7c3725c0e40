"""Credentials for MLflow and the Ray Jobs API, read from the environment only.

MLflow's client sends HTTP basic auth by itself when ``MLFLOW_TRACKING_USERNAME``
and ``MLFLOW_TRACKING_PASSWORD`` are set (``mlflow.utils.credentials``), so the
pipeline only checks that they come as a pair. Ray's job client attaches a
token only when the *client's* ``RAY_AUTH_MODE`` is ``token``; passing
``ray_auth_headers()`` explicitly makes the token alone enough, found where Ray
itself looks for it: ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``,
else ``~/.ray/auth_token`` (what ``ray get-auth-token --generate`` writes and
``ray start`` reads; Ray 2.52+, ``ray/_private/authentication``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from jobs.errors import JobError

MLFLOW_USERNAME = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
RAY_AUTH_TOKEN = "RAY_AUTH_TOKEN"
RAY_AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"


def check_mlflow_credentials(env: Mapping[str, str] | None = None) -> bool:
    """True when both MLflow credentials are set, False when neither; a lone one is an error."""
    env = os.environ if env is None else env
    user, password = env.get(MLFLOW_USERNAME, ""), env.get(MLFLOW_PASSWORD, "")
    if bool(user) != bool(password):
        missing = MLFLOW_PASSWORD if user else MLFLOW_USERNAME
        present = MLFLOW_USERNAME if user else MLFLOW_PASSWORD
        raise JobError(f"{present} is set but {missing} is not: set both or neither")
    return bool(user)


def ray_token_file(env: Mapping[str, str]) -> Path | None:
    """Where Ray keeps its token for this environment: ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray``."""
    if env.get(RAY_AUTH_TOKEN_PATH):
        return Path(env[RAY_AUTH_TOKEN_PATH]).expanduser()
    return Path(env["HOME"]) / ".ray" / "auth_token" if env.get("HOME") else None


def ray_auth_token(env: Mapping[str, str] | None = None) -> str | None:
    """The Ray token: ``$RAY_AUTH_TOKEN``, else Ray's token file, else None (no auth)."""
    env = os.environ if env is None else env
    token = env.get(RAY_AUTH_TOKEN, "").strip()
    if token:
        return token
    path = ray_token_file(env)
    if path is None or not path.exists():
        return None
    try:
        return path.read_text().strip() or None
    except OSError as e:
        raise JobError(f"cannot read the Ray token file {path}: {e.strerror}") from None


def ray_auth_headers(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` when a Ray token is found, else ``{}``."""
    token = ray_auth_token(env)
    return {"Authorization": f"Bearer {token}"} if token else {}
