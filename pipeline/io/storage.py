"""Object storage: the one place that turns a location URI into bytes, a pyarrow filesystem or a boto3 client.

A location is ``s3://bucket/prefix/...`` or a local path (plain or ``file:///absolute/path``), parsed by
:func:`pipeline.io.paths.parse_location`: any other string (``gs://x``, ``s3://`` without a bucket) raises its
LocationError, a ValueError, rather than being taken as a local folder of that name. S3 settings come only
from the environment: ``AWS_ENDPOINT_URL`` (optional), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION`` (default us-east-1); credentials never reach logs or errors (:func:`redact`). Every S3
call goes through :func:`retry`, which rides out a server restart or throttling for up to a minute of backoff
(``CCNET_STORAGE_RETRY_SECONDS``); a dead endpoint fails after that.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions as bce
import pyarrow.fs

from pipeline.io.paths import parse_location, stays_inside
from pipeline.io.redaction import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

_TMP_MARK = ".storage-tmp-"  # prefix of in-progress local writes; list_files hides them
_MISSING = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden", "InvalidToken",
         "ExpiredToken"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
              "TooManyRequestsException", "InternalError", "ServiceUnavailable"}
# pyarrow reports S3 failures as OSError text ("AWS Error NETWORK_CONNECTION ...", "HTTP status 503").
_TRANSIENT_TEXT = re.compile(r"connect|timed? ?out|timeout|slow.?down|throttl|service.?unavailable|internal"
                             r".?(failure|error)|reset by peer|broken pipe|curlcode|\b50[0234]\b", re.I)
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: temp files are created 0600, renamed files get the mode open() would give

_lock = threading.Lock()
_cache: dict[tuple, Any] = {}  # ("fs" | "client", endpoint, scheme, key id, secret digest, region) -> object
_sleep = time.sleep  # tests replace this to retry without waiting


class StorageError(RuntimeError):
    """A storage operation failed; the message is one line naming the (redacted) location and the cause."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object was created or changed since the version the writer named."""


def is_s3(uri: str) -> bool:
    """True for ``s3://`` locations, False for local paths and ``file://`` URIs; LocationError for neither."""
    return parse_location(uri).is_s3


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b"); the key has no leading or trailing "/"."""
    location = parse_location(uri)
    if location.bucket is None:
        raise ValueError(f"not an s3://bucket/key location: {redact(uri)}")
    return location.bucket, location.path


def _local_path(uri: str) -> str:
    """The local path of a local location (a ``file://`` URI's path, percent-decoded; a plain path as is)."""
    return parse_location(uri).path


def join(uri: str, *parts: str) -> str:
    """Appends path parts to a location: ``join("s3://b/p", "a", "b.parquet") == "s3://b/p/a/b.parquet"``.

    Parts may hold "/" but must stay under ``uri``: an empty or absolute part, or one with a ``..``
    component, raises ValueError naming it.
    """
    for part in parts:
        if not stays_inside(part):
            raise ValueError(f"path part {part!r} is empty, absolute or escapes {redact(uri)}")
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])
    if uri[:7].lower() == "file://":
        return Path(os.path.join(_local_path(uri), *parts)).as_uri()
    return os.path.join(uri, *parts)


def _s3_env() -> tuple[str | None, str, str | None, str | None, str]:
    """(endpoint "host:port" or None for AWS, scheme, key id, secret, region) from the environment.

    Without either key the AWS SDK's default chain applies (an EC2 instance profile, a web identity); one key
    without the other is a mistake.
    """
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    missing = [name for name in names if not os.environ.get(name)]
    if len(missing) == 1:
        raise StorageError(f"S3 credentials incomplete: {missing[0]} is not set but "
                           f"{next(n for n in names if n not in missing)} is")
    endpoint, scheme = None, "https"
    if url := os.environ.get("AWS_ENDPOINT_URL"):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or "@" in parsed.netloc:
            raise StorageError(f"AWS_ENDPOINT_URL must be http(s)://host[:port], got {redact(url)!r}")
        endpoint, scheme = parsed.netloc, parsed.scheme
    region = os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    key_id, secret = (os.environ.get(name) or None for name in names)
    return endpoint, scheme, key_id, secret, region


def _cached(kind: str, build: Callable[..., T]) -> T:
    endpoint, scheme, key_id, secret, region = env = _s3_env()
    # The secret's digest in the key: a changed secret must not reuse an object built with the old one.
    digest = hashlib.sha256(secret.encode()).hexdigest() if secret else None
    key = (kind, endpoint, scheme, key_id, digest, region)
    with _lock:
        if key not in _cache:
            _cache[key] = build(*env)
        return _cache[key]


class _S3FileSystem(pyarrow.fs.S3FileSystem):
    """pyarrow's S3 filesystem whose retry strategy survives pickling.

    Ray pickles the filesystem to its Train controller and workers, and pyarrow's own pickling drops the
    retry strategy: there, a server restart of a few seconds failed the whole run at the next checkpoint.
    """

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        _, (options,) = super().__reduce__()
        return _rebuild_filesystem, (options,)


def _rebuild_filesystem(options: dict[str, Any]) -> _S3FileSystem:
    return _S3FileSystem(**options, retry_strategy=_arrow_retry_strategy())


def arrow_attempts(budget: float) -> int:
    """Attempts of pyarrow's AWS standard retry strategy (for Ray's checkpoint uploads and Parquet reads)
    that last about ``budget`` s against a dead endpoint: measured here, 7 attempts take about 29 s and each
    further one about 18 s (the SDK's backoff is capped at 20 s, with jitter)."""
    if budget < 29:
        return 1 + math.ceil(budget * 6 / 29)
    return 7 + math.ceil((budget - 29) / 18)


def _arrow_retry_strategy() -> pyarrow.fs.S3RetryStrategy:
    return pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=arrow_attempts(retry_budget()))


def _build_filesystem(endpoint: str | None, scheme: str, key_id: str | None, secret: str | None,
                      region: str) -> Any:
    return _S3FileSystem(
        access_key=key_id, secret_key=secret, region=region, scheme=scheme, endpoint_override=endpoint,
        connect_timeout=3, request_timeout=30, retry_strategy=_arrow_retry_strategy(),
    )


def _build_client(endpoint: str | None, scheme: str, key_id: str | None, secret: str | None,
                  region: str) -> Any:
    config = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2, read_timeout=10,
        s3={"addressing_style": "path"} if endpoint else None,  # virtual hosts need DNS a local server lacks
    )
    # A session of its own: boto3's default session is not thread-safe.
    return boto3.session.Session().client(
        "s3", endpoint_url=f"{scheme}://{endpoint}" if endpoint else None, aws_access_key_id=key_id,
        aws_secret_access_key=secret, region_name=region, config=config,
    )


def filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """Returns ``(filesystem, path inside it)`` for a location.

    S3: an ``S3FileSystem`` for the environment (cached per endpoint, credentials and region) and
    ``bucket/key`` without ``s3://``, the form Ray and pyarrow want next to a filesystem object.
    Local: ``LocalFileSystem`` and the absolute path.
    """
    if not is_s3(uri):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(_local_path(uri))
    bucket, key = _split_s3(uri)
    return _cached("fs", _build_filesystem), f"{bucket}/{key}" if key else bucket


def s3_client() -> Any:
    """Returns a boto3 S3 client for the environment (cached per endpoint, credentials and region).

    Timeouts are short (2 s connect, 10 s per read) and botocore retries once: :func:`retry` owns the policy.
    """
    return _cached("client", _build_client)


def _clear_caches() -> None:
    """Forgets cached clients and filesystems (tests that change the environment call this)."""
    with _lock:
        _cache.clear()


def _code(exc: BaseException) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, bce.ClientError) else ""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, bce.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return _code(exc) in _TRANSIENT or status >= 500 or status == 429
    if isinstance(exc, (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError, ConnectionError,
                        TimeoutError)):
        return True
    return type(exc) is OSError and bool(_TRANSIENT_TEXT.search(str(exc)))  # not FileNotFoundError & co


def _describe(what: str, exc: BaseException) -> str:
    """``what``, the error and the endpoint as one redacted line."""
    endpoint = f" [endpoint {url}]" if (url := os.environ.get("AWS_ENDPOINT_URL")) else ""
    return redact(" ".join(f"{what}: {type(exc).__name__}: {exc}{endpoint}".split()))


def _final(what: str, exc: Exception) -> Exception | None:
    """The error to raise at once for a non-transient ``exc`` (itself if not a storage error), else None."""
    if _code(exc) in _CONFLICT:
        return PreconditionFailed(f"{redact(what)}: changed by another writer ({_code(exc)})")
    if _code(exc) in _MISSING:
        return FileNotFoundError(errno.ENOENT, f"{redact(what)}: not found ({_code(exc)})")
    if _code(exc) in _AUTH or (type(exc) is OSError and "ACCESS_DENIED" in str(exc)):
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


def retry(fn: Callable[[], T], *, what: str, attempts: int | None = None, base_delay: float = 0.5,
          max_delay: float = 8.0) -> T:
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
        delays = [min(max_delay, base_delay * 2 ** i) for i in range(attempts - 1)]
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


def _s3(op: str, uri: str, fn: Callable[[str, str], T]) -> T:
    bucket, key = _split_s3(uri)
    return retry(lambda: fn(bucket, key), what=f"{op} {redact(uri)}")


def ensure_bucket(uri: str) -> None:
    """Makes ``uri`` writable: creates its S3 bucket if missing (idempotent), or ``mkdir -p`` a local path."""
    if not is_s3(uri):
        os.makedirs(_local_path(uri), exist_ok=True)
        return

    def create(bucket: str, _: str) -> None:
        client = s3_client()
        try:
            client.head_bucket(Bucket=bucket)  # first: a user may read a bucket it may not create
            return
        except bce.ClientError as exc:
            if _code(exc) not in _MISSING:
                raise
        region = client.meta.region_name
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            client.create_bucket(Bucket=bucket, **extra)
        except bce.ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # lost a race: fine
                raise

    _s3("create bucket", f"s3://{_split_s3(uri)[0]}", create)


def exists(uri: str) -> bool:
    """True when a file (local) or object (S3) is stored at exactly ``uri``; folders and prefixes are not."""
    if not is_s3(uri):
        return os.path.isfile(_local_path(uri))
    try:
        _s3("check", uri, lambda bucket, key: s3_client().head_object(Bucket=bucket, Key=key))
    except FileNotFoundError:
        return False
    return True


def read_bytes(uri: str) -> bytes:
    """Returns the whole file/object; FileNotFoundError naming ``uri`` when it does not exist."""
    if not is_s3(uri):
        try:
            return Path(_local_path(uri)).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file", redact(uri)) from None
    return _s3("read", uri, lambda bucket, key: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())


def write_bytes(uri: str, data: bytes) -> None:
    """Stores ``data`` at ``uri`` atomically: readers see the old or the new content, never a part.

    Local: a hidden temporary file in the same folder (parents created), then ``os.replace``; on failure
    the temporary file is removed. S3: one ``put_object`` (objects appear whole; repeating it is harmless).
    """
    if is_s3(uri):
        _s3("write", uri, lambda bucket, key: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    folder, name = os.path.split(os.path.abspath(_local_path(uri)))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_MARK}{name}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the content is on disk before the name points at it
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """Returns ``(content, version)`` of the file/object at ``uri``, or None when there is none; the
    version is what :func:`write_if` compares (the S3 ETag; locally a digest of the content)."""
    if not is_s3(uri):
        try:
            data = Path(_local_path(uri)).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def get(bucket: str, key: str) -> tuple[bytes, str]:
        response = s3_client().get_object(Bucket=bucket, Key=key)
        return response["Body"].read(), response["ETag"]

    try:
        return _s3("read", uri, get)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _folder_lock(uri: str) -> Iterator[None]:
    """An exclusive ``flock`` of the local file's folder (no lock file left behind), released on leaving."""
    import fcntl  # POSIX only, as the local store's atomic rename already is

    fd = os.open(os.path.dirname(os.path.abspath(_local_path(uri))), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_if(uri: str, data: bytes, version: str | None) -> str:
    """Compare-and-swap: stores ``data`` only if ``uri`` is absent (``version`` None) or still holds
    ``version`` (from :func:`read_versioned`); returns the new version.

    S3: ``put_object`` with ``If-None-Match: *`` or ``If-Match: <ETag>`` (the store decides atomically).
    Local: the comparison and the atomic replace happen under an exclusive ``flock`` of the file's folder,
    which every writer on the machine (or on an NFSv4 share) respects.

    Raises:
        PreconditionFailed: another writer created or changed the object first.
    """
    what = f"write {redact(uri)}"
    if is_s3(uri):
        condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
        response = _s3("write", uri, lambda bucket, key: s3_client().put_object(
            Bucket=bucket, Key=key, Body=data, **condition))
        return response["ETag"]
    os.makedirs(os.path.dirname(os.path.abspath(_local_path(uri))), exist_ok=True)
    with _folder_lock(uri):
        current = read_versioned(uri)
        if (current[1] if current else None) != version:
            raise PreconditionFailed(f"{what}: changed by another writer")
        write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


def delete_if(uri: str, version: str) -> bool:
    """Removes ``uri`` only if it still holds ``version``; False (nothing removed) when it changed or is gone.

    S3 stores without conditional deletes remove it after a check instead (a race of milliseconds)."""
    current = read_versioned(uri)
    if current is None or current[1] != version:
        return False
    if is_s3(uri):
        try:
            _s3("delete", uri, lambda bucket, key: s3_client().delete_object(Bucket=bucket, Key=key,
                                                                              IfMatch=version))
        except (PreconditionFailed, FileNotFoundError):
            return False
        return True
    with _folder_lock(uri):
        current = read_versioned(uri)
        if current is None or current[1] != version:
            return False
        Path(_local_path(uri)).unlink()
    return True


def list_files(uri: str) -> list[str]:
    """Returns the sorted, "/"-separated names relative to ``uri`` of all files under it, recursively;
    [] when there are none (a missing folder or bucket included)."""
    if not is_s3(uri):
        root = _local_path(uri)
        paths = (os.path.join(folder, file) for folder, _, files in os.walk(root) for file in files)
        return sorted(os.path.relpath(path, root).replace(os.sep, "/") for path in paths
                      if not os.path.basename(path).startswith(_TMP_MARK))

    def listing(bucket: str, key: str) -> list[str]:
        prefix = f"{key}/" if key else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        return sorted(k[len(prefix):] for k in keys if not k.endswith("/"))  # "/"-ended keys: folder markers

    try:
        return _s3("list", uri, listing)
    except FileNotFoundError:
        return []


def delete(uri: str) -> None:
    """Removes the file/object at ``uri``; a missing one (or bucket) is fine."""
    if not is_s3(uri):
        Path(_local_path(uri)).unlink(missing_ok=True)
        return
    try:
        _s3("delete", uri, lambda bucket, key: s3_client().delete_object(Bucket=bucket, Key=key))
    except FileNotFoundError:
        pass


def delete_tree(uri: str) -> int:
    """Removes every file under ``uri`` (and, locally, the emptied folders); returns how many files."""
    names = list_files(uri)
    for name in names:
        delete(join(uri, name))
    if not is_s3(uri) and os.path.isdir(root := _local_path(uri)):
        for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
            with contextlib.suppress(OSError):  # not empty: a file appeared meanwhile
                os.rmdir(folder)
    return len(names)


def size(uri: str) -> int:
    """Returns the size in bytes of the file/object at ``uri``; FileNotFoundError when missing."""
    if not is_s3(uri):
        return os.path.getsize(_local_path(uri))
    head = _s3("stat", uri, lambda bucket, key: s3_client().head_object(Bucket=bucket, Key=key))
    return int(head["ContentLength"])
