"""What a secret looks like in text: URI userinfo (``https://user:pass@host``) and the values of the
credential variables of the environment. Storage, tracking, job submission and config validation ask here."""

from __future__ import annotations

import os
import re

USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN")
REDACTED = "***"
# Parts of a name (a config key, an environment variable) that say its value is a secret.
SECRET_NAME_PARTS = ("secret", "password", "passwd", "token", "key_id", "access_key", "api_key", "credential",
                     "private")
_MIN_SECRET_CHARS = 6  # shorter values are placeholders ("test"); replacing them everywhere garbles text


def redact(text: str) -> str:
    """``text`` without URI userinfo (``s3://user:pass@host`` -> ``s3://***@host``) and without the current
    values of :data:`SECRET_ENV` (from 6 characters)."""
    text = USERINFO.sub(rf"\1{REDACTED}@", text)
    for name in SECRET_ENV:
        if len(value := os.environ.get(name, "")) >= _MIN_SECRET_CHARS:
            text = text.replace(value, REDACTED)
    return text


def holds_secret(text: str) -> bool:
    """Whether :func:`redact` would change ``text``: URI credentials, or a current secret's value."""
    return redact(text) != text


def is_secret_name(name: str) -> bool:
    """Whether ``name`` (``AWS_SECRET_ACCESS_KEY``, ``tracking.password``, ...) names a secret."""
    return any(part in name.lower() for part in SECRET_NAME_PARTS)


def has_userinfo(text: str) -> bool:
    """Whether ``text`` holds a URI with credentials in it."""
    return USERINFO.search(text) is not None
