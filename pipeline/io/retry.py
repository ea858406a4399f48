"""Retries for object storage: which S3 errors are worth another attempt, and a backoff with jitter sized as
a time budget (``CCNET_STORAGE_RETRY_SECONDS``, 60 s by default) for both the boto3 and the pyarrow clients.

Every give-up names the operation and the (redacted) object; a missing object, a conflicting conditional
write and rejected credentials fail at once, with their own errors.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

import botocore.exceptions as bce

from pipeline.io.errors import PreconditionFailed, StorageError
from pipeline.io.redaction import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

MISSING = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
_AUTH = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "Forbidden",
    "InvalidToken",
    "ExpiredToken",
}
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "TooManyRequestsException",
    "InternalError",
    "ServiceUnavailable",
}
# pyarrow reports S3 failures as OSError text ("AWS Error NETWORK_CONNECTION ...", "HTTP status 503").
_TRANSIENT_TEXT = re.compile(
    r"connect|timed? ?out|timeout|slow.?down|throttl|service.?unavailable|internal"
    r".?(failure|error)|reset by peer|broken pipe|curlcode|\b50[0234]\b",
    re.I,
)
_sleep = time.sleep  # tests replace this to retry without waiting


def error_code(exc: BaseException) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, bce.ClientError) else ""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, bce.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return error_code(exc) in _TRANSIENT or status >= 500 or status == 429
    if isinstance(
        exc,
        (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError, ConnectionError, TimeoutError),
    ):
        return True
    return type(exc) is OSError and bool(_TRANSIENT_TEXT.search(str(exc)))  # not FileNotFoundError & co


def _describe(what: str, exc: BaseException) -> str:
    """``what``, the error and the endpoint as one redacted line."""
    endpoint = f" [endpoint {url}]" if (url := os.environ.get("AWS_ENDPOINT_URL")) else ""
    return redact(" ".join(f"{what}: {type(exc).__name__}: {exc}{endpoint}".split()))


def _final(what: str, exc: Exception) -> Exception | None:
    """The error to raise at once for a non-transient ``exc`` (itself if not a storage error), else None."""
    if error_code(exc) in CONFLICT:
        return PreconditionFailed(f"{redact(what)}: changed by another writer ({error_code(exc)})")
    if error_code(exc) in MISSING:
        return FileNotFoundError(errno.ENOENT, f"{redact(what)}: not found ({error_code(exc)})")
    if error_code(exc) in _AUTH or (type(exc) is OSError and "ACCESS_DENIED" in str(exc)):
        target = match.group(0) if (match := re.search(r"s3://\S+", what)) else "S3"
        hint = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        return StorageError(redact(f"credentials rejected for {target}: {_describe(what, exc)}; {hint}"))
    if _is_transient(exc):
        return None
    storage_error = isinstance(exc, (bce.BotoCoreError, bce.ClientError))
    return StorageError(_describe(what, exc)) if storage_error else exc


RETRY_SECONDS_ENV = "CCNET_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 60.0


def retry_budget() -> float:
    """Seconds of backoff :func:`retry` may spend on one operation: ``CCNET_STORAGE_RETRY_SECONDS`` or 60.

    A restart of a loaded object store, throttling or a load balancer's failover outlast a few seconds; a
    dead endpoint still fails in about a minute. Raise it for a store known to blip for longer.
    """
    raw = os.environ.get(RETRY_SECONDS_ENV, "")
    if not raw:
        return DEFAULT_RETRY_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{RETRY_SECONDS_ENV}={raw!r}: expected a number of seconds >= 0")
    return seconds


def backoff_schedule(budget: float, base_delay: float = 0.5, max_delay: float = 8.0) -> list[float]:
    """The nominal waits before each retry: ``base_delay`` doubled up to ``max_delay``, while their sum fits.

    >>> backoff_schedule(20)
    [0.5, 1.0, 2.0, 4.0, 8.0]
    """
    delays: list[float] = []
    delay = base_delay
    while sum(delays) + delay <= budget:
        delays.append(delay)
        delay = min(max_delay, delay * 2)
    return delays


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int | None = None,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
) -> T:
    """Calls ``fn`` until it succeeds, retrying transient storage errors with exponential backoff + jitter.

    Args:
        fn: the operation (it must be safe to repeat).
        what: names the operation in the warning logged per retry and in errors, e.g. "read s3://b/k".
        attempts: calls in total; by default as many as the backoff fits into :func:`retry_budget` (60 s:
            11 calls), so the policy is a time budget, the same for every operation.
        base_delay: seconds before the first retry, doubled each time up to ``max_delay`` and scaled by a
            random factor in [0.5, 1] so that many clients do not retry in step.

    Raises:
        StorageError: transient errors outlasted the attempts (names ``what``, the last error and the
            endpoint), or S3 rejected the credentials or the request (not retried).
        FileNotFoundError: the object or bucket does not exist (not retried).
        Exception: any other error from ``fn``, unchanged and not retried.
    """
    if attempts is None:
        delays = backoff_schedule(retry_budget(), base_delay, max_delay)
    elif attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    else:
        delays = [min(max_delay, base_delay * 2**i) for i in range(attempts - 1)]
    total = len(delays) + 1
    for attempt in range(1, total + 1):
        try:
            return fn()
        except Exception as exc:
            if (final := _final(what, exc)) is exc:
                raise
            # "from None": the message names the cause, redacted; the cause itself (a server's StringToSign,
            # say) may echo the key id into a logged traceback.
            if final is not None:
                raise final from None
            if attempt == total:
                raise StorageError(f"gave up after {total} attempts: {_describe(what, exc)}") from None
            delay = delays[attempt - 1] * random.uniform(0.5, 1.0)
            log.warning("retry %d/%d in %.1f s: %s", attempt, total - 1, delay, _describe(what, exc))
            _sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")
