"""Keep secrets out of tracking and writes inside the storage root.

Everything logged to MLflow (params, tags, artifacts) passes through
``redact`` first: a credential in a config or a URI never reaches the server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
# Key names that hold credentials, matched as whole words inside the key
# (``aws_secret_access_key``, ``token``, ``mlflow_password``), not ``tokenizer``.
_SECRET_KEY = re.compile(
    r"(^|[._-])(secret|password|passwd|token|key|credentials?|auth)([._-]|$)", re.IGNORECASE
)
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact_uri(value: str) -> str:
    """``https://user:pw@host/x`` -> ``https://***@host/x``; also inside longer strings."""
    return _URI_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", value)


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` with secret-named keys and URI credentials replaced by ``***``."""
    if key and is_secret_key(key.rsplit(".", 1)[-1]) and value not in (None, ""):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_uri(value)
    return value


def strip_query_secrets(uri: str) -> str:
    """Drop a URI's query string (presigned URLs carry signatures there)."""
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
