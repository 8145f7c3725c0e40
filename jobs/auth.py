"""Credentials for MLflow and the Ray Jobs API, read from the environment only.

MLflow's client sends HTTP basic auth by itself when ``MLFLOW_TRACKING_USERNAME``
and ``MLFLOW_TRACKING_PASSWORD`` are set (``mlflow.utils.credentials``), so the
pipeline only checks that they come as a pair. Ray's job client attaches a
token only when the *client's* ``RAY_AUTH_MODE`` is ``token``; passing
``ray_auth_headers()`` explicitly makes ``RAY_AUTH_TOKEN`` alone enough.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from jobs.errors import JobError

MLFLOW_USERNAME = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
RAY_AUTH_TOKEN = "RAY_AUTH_TOKEN"


def check_mlflow_credentials(env: Mapping[str, str] | None = None) -> bool:
    """True when both MLflow credentials are set, False when neither; a lone one is an error."""
    env = os.environ if env is None else env
    user, password = env.get(MLFLOW_USERNAME, ""), env.get(MLFLOW_PASSWORD, "")
    if bool(user) != bool(password):
        missing = MLFLOW_PASSWORD if user else MLFLOW_USERNAME
        present = MLFLOW_USERNAME if user else MLFLOW_PASSWORD
        raise JobError(f"{present} is set but {missing} is not: set both or neither")
    return bool(user)


def ray_auth_headers(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` when ``RAY_AUTH_TOKEN`` is set, else ``{}``."""
    env = os.environ if env is None else env
    token = env.get(RAY_AUTH_TOKEN, "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}
