"""Which keys and values hold credentials, and copies of configs without them.

Lives in ``pipeline`` (the lowest layer that writes anything a user shares: the
manifest); MLflow, Ray jobs, schedules and logs in ``jobs`` import it from here.

Two ways to keep a credential in: by key (``PGPASSWORD``, ``data.s3.secret``,
``apiKeys``) and by value (``https://user:pw@host``, ``?sig=...`` of a presigned
URL). ``redact`` replaces both with ``***`` (for what people read: params,
manifests, logs, error messages); ``split_secrets`` and
``strip_uri_credentials`` remove them (for what must still work: a job's
config, a stored schedule).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"
# How ``split_secrets`` names a value that was shipped or stored with its credentials stripped.
IN_VALUE = " (credentials in the value)"
# Words that name a credential wherever they appear in a key (``aws_secret_access_key``,
# ``RAY_AUTH_TOKEN``, ``DB_PASS``); whole words only, so ``tokenizer`` and ``monkey`` pass.
_SECRET_WORDS = frozenset(
    {"secret", "secrets", "password", "passwords", "passwd", "pass", "pwd", "passphrase",
     "token", "tokens", "key", "keys", "apikey", "apikeys", "credential", "credentials", "auth",
     "authorization", "cookie", "cookies", "signature", "sig", "dsn", "webhook", "webhooks",
     "bearer"}
)  # fmt: skip
# One word glued from a credential and its kind (``PGPASSWORD``, ``AUTHTOKEN``, ``SECRETKEY``).
_GLUED_SUFFIXES = ("password", "passwd", "passphrase", "secret", "secrets", "credential")
_GLUED = re.compile(
    r"^(auth|access|refresh|bearer|session|api|secret|private|signing)(token|key)s?$"
)
# A following word that describes or locates the credential instead of holding it
# (``RAY_AUTH_MODE``, ``MLFLOW_AUTH_CONFIG_PATH``); URIs are still checked by value.
_DESCRIPTOR_NEXT = frozenset(
    {"mode", "type", "types", "method", "enabled", "count", "len", "length",
     "config", "path", "file", "dir", "url", "uri", "endpoint"}
)  # fmt: skip
# Words whose URL or string *is* the credential, whatever follows (``webhook_url``,
# ``connection_string``, ``authorization_header``).
_HOLDER_NEXT = {
    "webhook": None, "webhooks": None, "dsn": None,
    "connection": {"string", "str", "url", "uri"},
    "conn": {"string", "str", "url", "uri"},
    "auth": {"header", "headers", "string"},
    "authorization": {"header", "headers", "string"},
}  # fmt: skip
# In a language-model code base "token" is also the unit of text: ``eos_token_id``,
# ``max_new_tokens`` and ``tokens_seen`` are not secrets, nor are "key"s of a table.
_TEXT_WORDS = frozenset({"token", "tokens", "key", "keys"})
_TEXT_PREV = frozenset(
    {"special", "added", "extra", "new", "max", "min", "num", "eos", "bos", "pad", "unk", "sep",
     "cls", "mask", "prompt", "input", "output", "total", "seen", "sample", "sort", "run",
     "missing", "unexpected", "dict", "primary", "foreign", "partition", "cache"}
)  # fmt: skip
_CREDENTIAL_PREV = frozenset({"api", "access", "secret", "private", "auth", "session", "ssh"})
# "auth" and "authorization" hold a credential only as the last word (``basic_auth``); before
# other words they are a namespace and those words decide (``RAY_AUTH_TOKEN``: yes,
# ``MLFLOW_AUTH_ADMIN_USERNAME``: no).
_NAMESPACE_WORDS = frozenset({"auth", "authorization"})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# Userinfo as users paste it: RFC 3986 forbids a raw "/" or "@" in it, but AWS secret keys
# hold "/" and passwords hold "@". A ":" (user:secret) lets it run to the last "@" before
# the end of the URI; without one, a single name up to the first "@" (``token@host``).
_URI_USERINFO = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)"
    r"(?P<userinfo>[^\s/@:'\"]*:(?!\d*(?:/|$|\s))[^\s'\"]*|[^\s/@:'\"]+)@"
)
_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def _words(key: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(key)]


def is_secret_key(key: str) -> bool:
    """Does a key with this name hold a credential (the last part of a dotted path counts)?"""
    words = _words(key.rsplit(".", 1)[-1])
    for i, word in enumerate(words):
        prev = words[i - 1] if i else ""
        following = words[i + 1] if i + 1 < len(words) else ""
        if word.endswith(_GLUED_SUFFIXES) or _GLUED.match(word):
            return True
        if word in _HOLDER_NEXT:
            holder = _HOLDER_NEXT[word]
            if holder is None or following in holder:
                return True
        if word not in _SECRET_WORDS:
            continue
        if word == "pwd" and len(words) == 1:
            continue  # $PWD is the working directory
        if following in _DESCRIPTOR_NEXT:
            continue
        if word in _TEXT_WORDS and prev in _TEXT_PREV:
            continue
        if word in ("token", "tokens") and following not in ("", "value", "string", "str"):
            continue
        if word == "keys" and prev and prev not in _CREDENTIAL_PREV:
            continue
        if following and word in _NAMESPACE_WORDS:
            continue
        return True
    return False


def is_credential(key: str, value: Any) -> bool:
    """``is_secret_key`` for a value that could be one: a count under ``tokens`` is not."""
    if value is None or value == "" or isinstance(value, Mapping) and not value:
        return False
    if not is_secret_key(key):
        return False
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return not (numeric and set(_words(key.rsplit(".", 1)[-1])) & _TEXT_WORDS)


def _query(uri: str, replace: str | None) -> str:
    parts = urlsplit(uri)
    if not parts.query:
        return uri
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(is_secret_key(k) for k, _ in pairs):
        return uri
    if replace is None:
        kept = [(k, v) for k, v in pairs if not is_secret_key(k)]
    else:
        kept = [(k, replace if is_secret_key(k) else v) for k, v in pairs]
    return urlunsplit(parts._replace(query=urlencode(kept, safe="*")))


def redact_uri(value: str) -> str:
    """``https://user:pw@host/x?sig=t`` -> ``https://***@host/x?sig=***``, also inside text."""
    value = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", value)
    return _URI.sub(lambda m: _query(m.group(0), REDACTED), value)


def strip_uri_credentials(value: str) -> str:
    """``value`` with every URI's userinfo and credential query parameters removed
    (``https://user:pw@host/x?sig=t&a=1`` -> ``https://host/x?a=1``), so that it still works
    where the credentials come from elsewhere (the environment)."""
    value = _URI_USERINFO.sub(lambda m: m["scheme"], value)
    return _URI.sub(lambda m: _query(m.group(0), None), value)


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` with secret-named keys and URI credentials replaced by ``***``."""
    if key and is_credential(key, value):
        return REDACTED
    if hasattr(value, "get_secret_value"):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_uri(value)
    return value


def split_secrets(tree: Any, path: str = "") -> tuple[Any, list[str]]:
    """``(kept, withheld)``: a copy of ``tree`` without credential-named keys and with
    credentials stripped out of values, and the dotted names of what was withheld (a value
    that was only stripped is named with `` (credentials in the value)``)."""
    if isinstance(tree, Mapping):
        kept, withheld = {}, []
        for key, value in tree.items():
            name = f"{path}.{key}" if path else str(key)
            if is_credential(str(key), value) or hasattr(value, "get_secret_value"):
                withheld.append(name)
                continue
            kept[key], more = split_secrets(value, name)
            withheld += more
        return kept, withheld
    if isinstance(tree, (list, tuple)):
        kept_items, withheld = [], []
        for i, value in enumerate(tree):
            item, more = split_secrets(value, f"{path}[{i}]")
            kept_items.append(item)
            withheld += more
        return type(tree)(kept_items), withheld
    if isinstance(tree, str):
        stripped = strip_uri_credentials(tree)
        if stripped != tree:
            return stripped, [f"{path}{IN_VALUE}"]
    return tree, []
