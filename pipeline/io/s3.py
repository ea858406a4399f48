"""S3 clients built from the environment: a boto3 client and a pyarrow filesystem, cached per endpoint,
credentials and region, with retries sized by the storage retry budget."""

from __future__ import annotations

import hashlib
import math
import os
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import boto3
import botocore.config
import pyarrow.fs

from pipeline.io.errors import StorageError
from pipeline.io.redaction import redact
from pipeline.io.retry import retry_budget

T = TypeVar("T")

_lock = threading.Lock()
_cache: dict[tuple, Any] = {}  # ("fs" | "client", endpoint, scheme, key id, secret digest, region) -> object


def _s3_env() -> tuple[str | None, str, str | None, str | None, str]:
    """(endpoint "host:port" or None for AWS, scheme, key id, secret, region) from the environment.

    Without either key the AWS SDK's default chain applies (an EC2 instance profile, a web identity); one key
    without the other is a mistake.
    """
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    missing = [name for name in names if not os.environ.get(name)]
    if len(missing) == 1:
        raise StorageError(
            f"S3 credentials incomplete: {missing[0]} is not set but "
            f"{next(n for n in names if n not in missing)} is"
        )
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


def _build_filesystem(
    endpoint: str | None, scheme: str, key_id: str | None, secret: str | None, region: str
) -> Any:
    return _S3FileSystem(
        access_key=key_id,
        secret_key=secret,
        region=region,
        scheme=scheme,
        endpoint_override=endpoint,
        connect_timeout=3,
        request_timeout=30,
        retry_strategy=_arrow_retry_strategy(),
    )


def _build_client(
    endpoint: str | None, scheme: str, key_id: str | None, secret: str | None, region: str
) -> Any:
    config = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": 2},
        connect_timeout=2,
        read_timeout=10,
        s3={"addressing_style": "path"} if endpoint else None,  # virtual hosts need DNS a local server lacks
    )
    # A session of its own: boto3's default session is not thread-safe.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=f"{scheme}://{endpoint}" if endpoint else None,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name=region,
        config=config,
    )


def s3_filesystem() -> pyarrow.fs.S3FileSystem:
    """pyarrow's S3 filesystem for the environment (cached per endpoint, credentials and region)."""
    return _cached("fs", _build_filesystem)


def s3_client() -> Any:
    """Returns a boto3 S3 client for the environment (cached per endpoint, credentials and region).

    Timeouts are short (2 s connect, 10 s per read) and botocore retries once: :func:`retry` owns the policy.
    """
    return _cached("client", _build_client)


def clear_caches() -> None:
    """Forgets cached clients and filesystems (tests that change the environment call this)."""
    with _lock:
        _cache.clear()
