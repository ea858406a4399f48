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
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import botocore.exceptions as bce
import pyarrow.fs

from pipeline.io.errors import PreconditionFailed
from pipeline.io.paths import parse_location, stays_inside
from pipeline.io.redaction import redact
from pipeline.io.retry import MISSING, error_code, retry
from pipeline.io.s3 import s3_client, s3_filesystem

log = logging.getLogger(__name__)
T = TypeVar("T")

_TMP_MARK = ".storage-tmp-"  # prefix of in-progress local writes; list_files hides them
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: temp files are created 0600, renamed files get the mode open() would give


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


def filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """Returns ``(filesystem, path inside it)`` for a location.

    S3: an ``S3FileSystem`` for the environment (cached per endpoint, credentials and region) and
    ``bucket/key`` without ``s3://``, the form Ray and pyarrow want next to a filesystem object.
    Local: ``LocalFileSystem`` and the absolute path.
    """
    if not is_s3(uri):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(_local_path(uri))
    bucket, key = _split_s3(uri)
    return s3_filesystem(), f"{bucket}/{key}" if key else bucket


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
            if error_code(exc) not in MISSING:
                raise
        region = client.meta.region_name
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            client.create_bucket(Bucket=bucket, **extra)
        except bce.ClientError as exc:
            if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # lost a race: fine
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
        response = _s3(
            "write",
            uri,
            lambda bucket, key: s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition),
        )
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
            _s3(
                "delete",
                uri,
                lambda bucket, key: s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=version),
            )
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
        return sorted(
            os.path.relpath(path, root).replace(os.sep, "/")
            for path in paths
            if not os.path.basename(path).startswith(_TMP_MARK)
        )

    def listing(bucket: str, key: str) -> list[str]:
        prefix = f"{key}/" if key else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        return sorted(k[len(prefix) :] for k in keys if not k.endswith("/"))  # "/"-ended keys: folder markers

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


CACHE_ENV = "CCNET_CACHE"  # where local copies of objects go; default ~/.cache/ccnet


def local_copy(uri: str) -> str:
    """A local path to the file at ``uri``: the path itself when local; for S3, a copy in the cache
    (``$CCNET_CACHE`` or ``~/.cache/ccnet``, ``objects/<sha256 of the URI>/<name>``) fetched again only when
    the object's size changed. FileNotFoundError naming ``uri`` when it does not exist."""
    if not is_s3(uri):
        path = _local_path(uri)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "no such file", redact(uri))
        return path
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ccnet")
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    path = os.path.join(root, "objects", hashlib.sha256(uri.encode()).hexdigest()[:32], name)
    expected = size(uri)
    if not (os.path.exists(path) and os.path.getsize(path) == expected):
        write_bytes(path, read_bytes(uri))  # atomic: a half-fetched copy never looks whole
    return path
