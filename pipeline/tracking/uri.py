"""Where runs are tracked, decided once per run, and whether that store answers at all.

Store-agnostic: the tracking URI's resolution, a one-second probe of an HTTP server, and the environment
variables a client library reads per call, set for one block.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from pipeline.io.redaction import redact

HEALTH_TIMEOUT_S = 1.0


def one_line(error: BaseException) -> str:
    """The first line of an error, redacted and cut: what a warning about the store quotes."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return redact(lines[0])[:300]


def resolve_tracking_uri(configured: str | None, default_dir: str = "runs") -> str:
    """The tracking URI to use: ``configured`` if set, else ``MLFLOW_TRACKING_URI``, else a sqlite file.

    Args:
        configured: ``tracking.uri`` from the run config (None or "" when unset).
        default_dir: folder of the fallback ``mlflow.db``; created when that fallback is chosen.

    Returns:
        A URI such as ``http://127.0.0.1:5000`` or ``sqlite:////abs/runs/mlflow.db`` (MLflow 3 refuses the
        old ``file:`` store, so the embedded default is sqlite).
    """
    if configured:
        return configured
    if from_env := os.environ.get("MLFLOW_TRACKING_URI"):
        return from_env
    folder = Path(default_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder}/mlflow.db"


@contextlib.contextmanager
def env(values: Mapping[str, str | None]) -> Iterator[None]:
    """Sets (None: removes) environment variables for the block and restores them after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(saved)


def _apply(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def is_http(uri: str) -> bool:
    return urllib.parse.urlsplit(uri).scheme in ("http", "https")


def answers(uri: str) -> bool:
    """True when an HTTP tracking server answers ``/health`` at all (any status) within about a second;
    True for every other kind of store, which has no cheap probe."""
    if not is_http(uri):
        return True
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]  # credentials are not needed for /health and must not be sent
    url = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S):
            return True
    except urllib.error.HTTPError:  # it answered, with an error status: reachable
        return True
    except urllib.error.URLError as error:  # a TLS complaint is an answer: MLflow has its own TLS settings
        return isinstance(error.reason, ssl.SSLError)
    except (OSError, ValueError):  # refused, timed out, unresolvable, malformed
        return False
