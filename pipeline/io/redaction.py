"""What a secret looks like in text: URI userinfo (``https://user:pass@host``) and the values of the
credential variables of the environment. Storage, tracking, job submission and config validation ask here."""

from __future__ import annotations

import logging
import os
import re

# ``scheme://user@`` or ``scheme://user:secret@``, where the secret may hold anything a careless user types,
# "/" and "@" included (real AWS secret keys hold "/"): it runs to the last "@" of the token (a token ends at
# white space or a quote). ``s3://bucket/key@v1`` (no ":" before a "/") is a location, not credentials.
_TOKEN = "[^\\s'\"<>]"
USERINFO = re.compile(rf"([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^\s'\"<>/@:]*:{_TOKEN}*|[^\s'\"<>/@]*)@")
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
REDACTED = "***"
# Parts of a name (a config key, an environment variable) that say its value is a secret.
SECRET_NAME_PARTS = (
    "secret",
    "password",
    "passwd",
    "token",
    "key_id",
    "access_key",
    "api_key",
    "credential",
    "private",
)
_MIN_SECRET_CHARS = 6  # shorter values are placeholders ("test"); replacing them everywhere garbles text
_MIN_PIECE_CHARS = 4  # a piece of a known secret this long is replaced wherever it appears
_known: set[str] = set()  # credentials seen in the command line (see :func:`remember`)


def redact(text: str) -> str:
    """``text`` without URI userinfo (``s3://user:pass@host`` -> ``s3://***@host``) and without the current
    values of :data:`SECRET_ENV` (from 6 characters)."""
    text = USERINFO.sub(rf"\1{REDACTED}@", text)
    for name in SECRET_ENV:
        if len(value := os.environ.get(name, "")) >= _MIN_SECRET_CHARS:
            text = text.replace(value, REDACTED)
    for piece in sorted(_known, key=len, reverse=True):  # longest first: no half-replaced secret
        text = text.replace(piece, REDACTED)
    return text


def remember(texts: list[str]) -> None:
    """Keeps the credentials of every URI in ``texts`` (the command line) so that :func:`redact` also removes
    what a library quotes of them: a parser that split ``s3://key:se/cret@host`` at "/" and complains about
    ``'key:se'`` names neither a whole URI nor a whole secret. Kept: each credential, its pieces between
    "/", "@", "?" and "#", and the parts of those between ":" from 4 characters."""
    for text in texts:
        for match in USERINFO.finditer(text):
            userinfo = match.group(0)[len(match.group(1)) : -1]
            pieces = [userinfo, *re.split(r"[/@?#]", userinfo)]
            pieces += [part for piece in pieces for part in piece.split(":") if len(part) >= _MIN_PIECE_CHARS]
            _known.update(piece for piece in pieces if ":" in piece or len(piece) >= _MIN_PIECE_CHARS)


def holds_secret(text: str) -> bool:
    """Whether :func:`redact` would change ``text``: URI credentials, or a current secret's value."""
    return redact(text) != text


def is_secret_name(name: str) -> bool:
    """Whether ``name`` (``AWS_SECRET_ACCESS_KEY``, ``tracking.password``, ...) names a secret."""
    return any(part in name.lower() for part in SECRET_NAME_PARTS)


def has_userinfo(text: str) -> bool:
    """Whether ``text`` holds a URI with credentials in it."""
    return USERINFO.search(text) is not None


class RedactingFilter(logging.Filter):
    """Passes every log record through :func:`redact` (the command installs it on its handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (clean := redact(message)) != message:
            record.msg, record.args = clean, ()
        return True
