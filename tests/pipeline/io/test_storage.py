"""pipeline.io.storage: locations, local and S3 round trips, retries, credentials and a server restart.

The S3 tests run against a real SeaweedFS server (``seaweedfs`` / ``s3_env`` in tests/conftest.py) and check
what they wrote with a boto3 client of their own, not through the module under test.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path

import boto3
import botocore.exceptions
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

import pipeline.io.retry as retries
from pipeline.io import s3, storage
from pipeline.io.errors import StorageError


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Makes ``retry`` record its waits instead of sleeping."""
    delays: list[float] = []
    monkeypatch.setattr(retries, "_sleep", delays.append)
    return delays


@pytest.fixture
def fake_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An S3 environment pointing at a closed port of 127.0.0.1 (nothing is contacted by construction)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again on leaving: connections are refused
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "AWS_ACCESS_KEY_ID": "AKIDTEST" + secrets.token_hex(4),
        "AWS_SECRET_ACCESS_KEY": "SECRET" + secrets.token_hex(12),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3.clear_caches()
    yield env
    s3.clear_caches()


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, "GetObject")


def flaky(errors: list[Exception], result: str = "ok") -> tuple[list[int], object]:
    """A function that raises ``errors`` one per call, then returns ``result``; and its call log."""
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return calls, fn


# Locations


def test_is_s3() -> None:
    assert storage.is_s3("s3://bucket/key") and storage.is_s3("S3://bucket")
    assert not any(storage.is_s3(uri) for uri in ("file:///tmp", "runs/a", "/data/x"))


@pytest.mark.parametrize("uri", ["/data/s3://x", "s3:/x", "s3://", "gs://bucket/x", "file://host/x"])
def test_storage_refuses_what_is_not_a_location(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every operation parses its location: none of these becomes a local folder of that name."""
    monkeypatch.chdir(tmp_path)
    for operation in (
        storage.is_s3,
        storage.ensure_bucket,
        storage.exists,
        storage.list_files,
        storage.filesystem,
        lambda uri: storage.write_bytes(uri, b"x"),
    ):
        with pytest.raises(ValueError, match=re.escape(repr(uri))):
            operation(uri)
    assert list(tmp_path.iterdir()) == []


def test_join() -> None:
    assert storage.join("s3://b/p", "a", "b.parquet") == "s3://b/p/a/b.parquet"
    assert storage.join("s3://b/p/", "a/b", "c") == "s3://b/p/a/b/c"
    assert storage.join("s3://b", "v1.2", "x..y") == "s3://b/v1.2/x..y"  # dots inside names are names
    assert storage.join("runs/data", "a", "b.json") == os.path.join("runs/data", "a", "b.json")
    assert storage.join("file:///tmp/x", "a b") == "file:///tmp/x/a%20b"


@pytest.mark.parametrize("base", ["s3://bucket/prefix", "/data/prefix", "file:///data/prefix"])
@pytest.mark.parametrize(
    "part", ["", "/etc/passwd", "..", "../x", "a/../../x", "a/..", "..\\x", "s3://other/x"]
)
def test_join_rejects_parts_that_leave_the_prefix(base: str, part: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(part))):
        storage.join(base, "ok", part)


def test_redact_strips_userinfo() -> None:
    text = "got s3://AKID:s3cr3t@bucket/key and http://user:pw@host:9000/x, kept s3://bucket/y"
    assert storage.redact(text) == "got s3://***@bucket/key and http://***@host:9000/x, kept s3://bucket/y"


def test_redact_strips_current_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE42")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    redacted = storage.redact("Credential=AKIDEXAMPLE42/2026 key wJalrXUtnFEMI/K7MDENG.")
    assert redacted == "Credential=***/2026 key ***."
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # a placeholder, not a secret: messages stay readable
    assert storage.redact("read s3://test-bucket/k") == "read s3://test-bucket/k"


# Filesystems and clients


def test_filesystem_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.filesystem("runs/a.parquet")
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path / "runs" / "a.parquet")
    assert storage.filesystem((tmp_path / "b c").as_uri())[1] == str(tmp_path / "b c")


def test_filesystem_s3_takes_endpoint_and_credentials_from_environment(fake_env: dict[str, str]) -> None:
    fs, path = storage.filesystem("s3://bucket/a/b.parquet")
    assert isinstance(fs, pyarrow.fs.S3FileSystem) and path == "bucket/a/b.parquet"
    options = fs.__reduce__()[1][0]  # what the filesystem was built with, as pickling records it
    assert options["endpoint_override"] == fake_env["AWS_ENDPOINT_URL"].removeprefix("http://")
    assert options["scheme"] == "http" and options["region"] == "eu-west-3"
    assert options["access_key"] == fake_env["AWS_ACCESS_KEY_ID"]
    assert storage.filesystem("s3://other")[0] is fs and storage.filesystem("s3://other")[1] == "other"


def test_clients_are_cached_per_environment(
    fake_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3.s3_client()
    assert client.meta.endpoint_url == fake_env["AWS_ENDPOINT_URL"] and client.meta.region_name == "eu-west-3"
    assert s3.s3_client() is client
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    assert s3.s3_client() is not client
    fs = storage.filesystem("s3://b")[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://storage.example:8443")
    assert storage.filesystem("s3://b")[0] is not fs
    assert s3.s3_client().meta.endpoint_url == "https://storage.example:8443"


def test_s3_settings_errors(fake_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="keys belong in the environment") as info:
        storage.filesystem("s3://AKID:topsecret@bucket/x")
    assert "topsecret" not in str(info.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://127.0.0.1:21")
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL"):
        s3.s3_client()
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY"):
        storage.filesystem("s3://bucket/x")


# Local files


@pytest.mark.parametrize("as_uri", [False, True])
def test_local_round_trip(tmp_path: Path, as_uri: bool) -> None:
    root = (tmp_path / "store").as_uri() if as_uri else str(tmp_path / "store")
    storage.ensure_bucket(storage.join(root, "empty"))
    assert (tmp_path / "store" / "empty").is_dir() and storage.list_files(root) == []
    for name, data in {"b.bin": b"\x00\x01", "a/c.txt": b"c", "a/d/e.txt": b"e" * 1000}.items():
        storage.write_bytes(storage.join(root, name), data)
    assert (tmp_path / "store" / "a" / "d" / "e.txt").read_bytes() == b"e" * 1000
    assert storage.read_bytes(storage.join(root, "a", "c.txt")) == b"c"
    assert storage.size(storage.join(root, "a/d/e.txt")) == 1000
    assert storage.exists(storage.join(root, "b.bin")) and not storage.exists(storage.join(root, "a"))
    assert storage.list_files(root) == ["a/c.txt", "a/d/e.txt", "b.bin"]
    assert storage.list_files(storage.join(root, "a")) == ["c.txt", "d/e.txt"]
    assert storage.list_files(storage.join(root, "missing")) == []
    storage.write_bytes(storage.join(root, "b.bin"), b"new")
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"new"
    storage.delete(storage.join(root, "b.bin"))
    storage.delete(storage.join(root, "b.bin"))  # missing is fine
    assert not storage.exists(storage.join(root, "b.bin"))
    with pytest.raises(FileNotFoundError, match=re.escape(storage.join(root, "b.bin"))):
        storage.read_bytes(storage.join(root, "b.bin"))
    with pytest.raises(FileNotFoundError):
        storage.size(storage.join(root, "b.bin"))


def test_local_write_leaves_only_the_final_file(tmp_path: Path) -> None:
    for data in (b"first", b"second, longer"):
        storage.write_bytes(str(tmp_path / "x.bin"), data)
    assert os.listdir(tmp_path) == ["x.bin"] and (tmp_path / "x.bin").read_bytes() == b"second, longer"
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o666 & ~storage._UMASK  # not mkstemp's 0600


def test_local_write_is_invisible_until_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.bin"
    seen: list[tuple] = []
    real_fsync = os.fsync

    def fsync_and_look(fd: int) -> None:  # runs when every byte is in the temporary file
        real_fsync(fd)
        seen.append(
            (
                target.exists(),
                storage.exists(str(target)),
                storage.list_files(str(tmp_path)),
                len(os.listdir(tmp_path)),
            )
        )

    monkeypatch.setattr(os, "fsync", fsync_and_look)
    storage.write_bytes(str(target), b"payload" * 100)
    assert seen == [(False, False, [], 1)]  # the temporary file exists, but not under the final name
    assert target.read_bytes() == b"payload" * 100


def test_local_failed_write_leaves_nothing_and_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.write_bytes(str(tmp_path / "old.bin"), b"old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    for name in ("old.bin", "new.bin"):
        with pytest.raises(OSError, match="No space left"):
            storage.write_bytes(str(tmp_path / name), b"partial?" * 1000)
    assert os.listdir(tmp_path) == ["old.bin"] and (tmp_path / "old.bin").read_bytes() == b"old"


# retry


TRANSIENT = [
    botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k"),
    botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b/k"),
    client_error("SlowDown", 503),
    client_error("InternalError", 500),
    OSError("When reading 'k' in bucket 'b': AWS Error NETWORK_CONNECTION during GetObject: curlCode: 7"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_retry_succeeds_after_transient_failures(
    error: Exception, sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    calls, fn = flaky([error, error])
    with caplog.at_level(logging.WARNING, logger="pipeline.io.retry"):
        assert retries.retry(fn, what="read s3://b/k") == "ok"
    assert len(calls) == 3 and len(sleeps) == 2
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2
    assert all("read s3://b/k" in r.getMessage() for r in caplog.records)


def test_retry_budget_is_a_minute_of_backoff_by_default(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loaded object store took longer than 11 s to restart: the default rides out about a minute."""
    monkeypatch.delenv(retries.RETRY_SECONDS_ENV, raising=False)
    calls, fn = flaky([client_error("SlowDown", 503)] * 20)
    with pytest.raises(StorageError, match="gave up after 11 attempts"):
        retries.retry(fn, what="read s3://b/k")
    nominal = retries.backoff_schedule(60.0)
    assert len(calls) == 11 and nominal == [0.5, 1.0, 2.0, 4.0, 8.0] + [8.0] * 5 and sum(nominal) <= 60
    assert all(c / 2 <= s <= c for s, c in zip(sleeps, nominal, strict=True))


@pytest.mark.parametrize(("raw", "attempts"), [("0", 1), ("3.5", 4), ("600", 79)])
def test_retry_budget_comes_from_the_environment(
    raw: str, attempts: int, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(retries.RETRY_SECONDS_ENV, raw)
    calls, fn = flaky([client_error("SlowDown", 503)] * 100)
    with pytest.raises(StorageError):
        retries.retry(fn, what="read s3://b/k")
    assert len(calls) == attempts and sum(sleeps) <= float(raw)


@pytest.mark.parametrize("raw", ["soon", "-1", "inf", "nan"])
def test_a_nonsense_retry_budget_is_refused_naming_the_variable(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(retries.RETRY_SECONDS_ENV, raw)
    with pytest.raises(ValueError, match=f"CCNET_STORAGE_RETRY_SECONDS={raw!r}"):
        retries.retry(lambda: "ok", what="read s3://b/k")


def test_retry_gives_up_after_attempts_with_capped_backoff(
    fake_env: dict[str, str], sleeps: list[float]
) -> None:
    error = botocore.exceptions.ConnectTimeoutError(endpoint_url="http://10.9.8.7:9000/b/k")
    calls, fn = flaky([error] * 6 + [client_error("SlowDown", 503)] * 4)
    with pytest.raises(StorageError) as info:
        retries.retry(fn, what="write s3://b/k", attempts=7, base_delay=0.5, max_delay=3.0)
    assert len(calls) == 7
    ceilings = [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]  # doubling, capped at max_delay
    assert len(sleeps) == 6 and all(c / 2 <= s <= c for s, c in zip(sleeps, ceilings, strict=True))
    message = str(info.value)  # the last error, which does not say where it came from: the endpoint is added
    assert "write s3://b/k" in message and "7 attempts" in message and "SlowDown" in message
    assert fake_env["AWS_ENDPOINT_URL"] in message and "\n" not in message


@pytest.mark.parametrize(
    ("error", "expected", "text"),
    [
        (client_error("NoSuchKey", 404), FileNotFoundError, "not found"),
        (client_error("404", 404), FileNotFoundError, "not found"),
        (client_error("AccessDenied", 403), StorageError, "credentials rejected for s3://b/k"),
        (client_error("SignatureDoesNotMatch", 403), StorageError, "credentials rejected for s3://b/k"),
        (client_error("InvalidAccessKeyId", 403), StorageError, "credentials rejected for s3://b/k"),
        (
            OSError("AWS Error ACCESS_DENIED during HeadObject operation"),
            StorageError,
            "credentials rejected",
        ),
        (client_error("InvalidBucketName", 400), StorageError, "InvalidBucketName"),
        (FileNotFoundError(errno.ENOENT, "Path does not exist 'b/k'"), FileNotFoundError, "does not exist"),
        (PermissionError(errno.EACCES, "Permission denied: connection.json"), PermissionError, "denied"),
        (ValueError("a bug, not a storage problem"), ValueError, "a bug"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_retry_does_not_retry_other_errors(
    error: Exception, expected: type, text: str, sleeps: list[float]
) -> None:
    calls, fn = flaky([error])
    with pytest.raises(expected, match=re.escape(text)):
        retries.retry(fn, what="read s3://b/k")
    assert len(calls) == 1 and sleeps == []


def test_retry_errors_and_logs_carry_no_credentials(
    fake_env: dict[str, str], sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    secret, key_id = fake_env["AWS_SECRET_ACCESS_KEY"], fake_env["AWS_ACCESS_KEY_ID"]
    error = botocore.exceptions.EndpointConnectionError(endpoint_url=f"http://{key_id}:{secret}@host/b")
    _, fn = flaky([error] * 3)
    with caplog.at_level(logging.WARNING, logger="pipeline.io.retry"), pytest.raises(StorageError) as info:
        retries.retry(fn, what="read s3://b/k", attempts=3)
    assert secret not in str(info.value) and key_id not in str(info.value) and "***@host" in str(info.value)
    assert caplog.records and secret not in caplog.text and key_id not in caplog.text


def test_unreachable_endpoint_fails_fast_naming_it(
    fake_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(storage, "retry", functools.partial(retries.retry, attempts=3, base_delay=0.01))
    endpoint = fake_env["AWS_ENDPOINT_URL"]
    for operation in (storage.read_bytes, storage.exists, lambda uri: storage.write_bytes(uri, b"x")):
        caplog.clear()
        logger = "pipeline.io.storage"
        with caplog.at_level(logging.WARNING, logger=logger), pytest.raises(StorageError) as info:
            operation("s3://bucket/key.bin")
        message = str(info.value)
        assert endpoint.removeprefix("http://") in message and "s3://bucket/key.bin" in message
        assert "\n" not in message and len(caplog.records) == 2  # one warning per retry


# S3, on a real server


def server_client(seaweedfs) -> object:
    """A boto3 client built here, independent of the module under test."""
    return boto3.client(
        "s3",
        endpoint_url=seaweedfs.endpoint,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
        region_name="us-east-1",
    )


def listening_addresses(pid: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets ``pid`` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # an fd closed meanwhile
            if (target := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith("socket:["):
                inodes.add(target[8:-1])
    tables = [Path(f"/proc/net/{name}").read_text().splitlines()[1:] for name in ("tcp", "tcp6")]
    rows = [line.split() for table in tables for line in table]
    return {row[1].rsplit(":", 1)[0] for row in rows if row[3] == "0A" and row[9] in inodes}  # 0A: LISTEN


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_seaweedfs_listens_on_loopback_only(seaweedfs) -> None:
    assert listening_addresses(seaweedfs.pid) == {"0100007F"}  # 127.0.0.1, little-endian hex


@pytest.mark.integration
def test_s3_round_trip(s3_env: str, seaweedfs) -> None:
    bucket = s3_env.removeprefix("s3://")
    storage.ensure_bucket(storage.join(s3_env, "datasets"))
    storage.ensure_bucket(s3_env)  # idempotent
    assert bucket in [b["Name"] for b in server_client(seaweedfs).list_buckets()["Buckets"]]
    missing = storage.join(s3_env, "missing.bin")
    assert not storage.exists(missing) and storage.list_files(s3_env) == []
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError):
        storage.size(missing)

    files = {"a.bin": b"\x00" * 10, "x/w.txt": b"w", "x/y/z.bin": os.urandom(70_000)}
    for name, data in files.items():
        storage.write_bytes(storage.join(s3_env, name), data)
    for name, data in files.items():
        assert server_client(seaweedfs).get_object(Bucket=bucket, Key=name)["Body"].read() == data
        assert storage.read_bytes(storage.join(s3_env, name)) == data
        assert storage.exists(storage.join(s3_env, name))
        assert storage.size(storage.join(s3_env, name)) == len(data)
    assert not storage.exists(storage.join(s3_env, "x"))  # a prefix is not an object
    assert storage.list_files(s3_env) == ["a.bin", "x/w.txt", "x/y/z.bin"]
    assert storage.list_files(storage.join(s3_env, "x")) == ["w.txt", "y/z.bin"]
    assert storage.list_files(storage.join(s3_env, "x/y/z.bin")) == []
    no_bucket = "s3://test-no-such-bucket-" + secrets.token_hex(4)
    assert storage.list_files(no_bucket) == [] and not storage.exists(storage.join(no_bucket, "k"))
    storage.delete(storage.join(no_bucket, "k"))  # fine too

    storage.write_bytes(storage.join(s3_env, "a.bin"), b"replaced")
    assert storage.read_bytes(storage.join(s3_env, "a.bin")) == b"replaced"
    storage.delete(storage.join(s3_env, "x/w.txt"))
    storage.delete(storage.join(s3_env, "x/w.txt"))  # missing is fine
    assert storage.list_files(s3_env) == ["a.bin", "x/y/z.bin"]
    assert "Contents" not in server_client(seaweedfs).list_objects_v2(Bucket=bucket, Prefix="x/w")


@pytest.mark.integration
def test_s3_parquet_through_filesystem(s3_env: str) -> None:
    storage.ensure_bucket(s3_env)
    uri = storage.join(s3_env, "tables", "part-0.parquet")
    fs, path = storage.filesystem(uri)
    assert path == uri.removeprefix("s3://")
    table = pa.table({"sample_id": ["a", "b", "c"], "label": pa.array([1, 2, 3], pa.int16())})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.list_files(s3_env) == ["tables/part-0.parquet"] and storage.read_bytes(uri)[:4] == b"PAR1"


@pytest.mark.integration
def test_s3_wrong_credentials(
    s3_env: str,
    seaweedfs,
    monkeypatch: pytest.MonkeyPatch,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage.ensure_bucket(s3_env)
    uri = storage.join(s3_env, "a.bin")
    storage.write_bytes(uri, b"a")
    wrong = "wrong" + secrets.token_hex(16)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    fs, path = storage.filesystem(uri)
    operations = [
        storage.read_bytes,
        storage.exists,
        storage.size,
        storage.list_files,
        storage.ensure_bucket,
        lambda u: storage.write_bytes(u, b"b"),
        lambda u: retries.retry(lambda: fs.get_file_info(path), what=f"stat {u}"),
    ]
    with caplog.at_level(logging.DEBUG):
        for operation in operations:
            with pytest.raises(StorageError, match="credentials rejected for s3://") as info:
                operation(uri)
            assert wrong not in str(info.value) and seaweedfs.secret_key not in str(info.value)
    assert sleeps == []  # rejected credentials are not retried
    assert wrong not in caplog.text and seaweedfs.secret_key not in caplog.text


@pytest.mark.integration
def test_s3_write_survives_server_restart(s3_env: str, seaweedfs, caplog: pytest.LogCaptureFixture) -> None:
    storage.ensure_bucket(s3_env)
    storage.write_bytes(storage.join(s3_env, "before.bin"), b"before")
    errors: list[BaseException] = []

    def restart_later() -> None:
        time.sleep(2)
        try:
            seaweedfs.start()
        except BaseException as exc:  # reported by the test thread below
            errors.append(exc)

    old_pid = seaweedfs.pid
    seaweedfs.stop()
    with pytest.raises(ProcessLookupError):  # stopped means gone, not a zombie or an orphan
        os.kill(old_pid, 0)
    restarter = threading.Thread(target=restart_later)
    restarter.start()
    start = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.io.retry"):
            storage.write_bytes(storage.join(s3_env, "during.bin"), b"written during the outage")
    finally:
        restarter.join()
    assert errors == [] and time.monotonic() - start > 1.5  # it did wait for the server
    assert any("write s3://" in r.getMessage() for r in caplog.records)
    assert storage.read_bytes(storage.join(s3_env, "during.bin")) == b"written during the outage"
    assert storage.read_bytes(storage.join(s3_env, "before.bin")) == b"before"


def test_without_keys_the_default_credential_chain_applies(
    fake_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EC2 instance profile or a web identity: no keys in the environment, the AWS SDK finds them."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    shared = tmp_path / "credentials"  # one link of the default chain, standing in for the instance profile
    shared.write_text("[default]\naws_access_key_id = AKIDCHAIN1234\naws_secret_access_key = chain-secret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    s3.clear_caches()
    credentials = s3.s3_client()._request_signer._credentials
    assert credentials.access_key == "AKIDCHAIN1234"
    fs, _ = storage.filesystem("s3://bucket/key")
    assert not fs.__reduce__()[1][0].get("access_key")  # left to the SDK's chain


def test_one_key_without_the_other_is_refused(
    fake_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3.clear_caches()
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY is not set but AWS_ACCESS_KEY_ID is"):
        s3.s3_client()


def test_pickled_filesystem_keeps_its_retry_strategy(fake_env: dict[str, str]) -> None:
    """Ray pickles the filesystem to its controller and workers; pyarrow's own pickling drops the retry
    strategy (a pickled plain S3FileSystem gives up on a dead endpoint within a second); ours is rebuilt with
    it."""
    import pickle

    fs, _ = storage.filesystem("s3://bucket/key")
    copy = pickle.loads(pickle.dumps(fs))
    assert type(copy) is type(fs) and copy.__reduce__()[0] is s3._rebuild_filesystem
    assert copy.__reduce__()[1] == fs.__reduce__()[1]  # same endpoint, credentials, timeouts
    # Riding out a real outage through the pickled copy: tests/faults/test_s3_outage.py (checkpoint uploads).


@pytest.mark.parametrize(("budget", "attempts"), [(0, 1), (10, 4), (29, 7), (60, 9), (600, 39)])
def test_pyarrows_attempts_follow_the_retry_budget(budget: float, attempts: int) -> None:
    """pyarrow's strategy counts attempts, not seconds: 7 take about 29 s, each further one about 18 s."""
    assert s3.arrow_attempts(budget) == attempts


def test_redact_takes_secrets_holding_slashes_at_signs_and_colons() -> None:
    assert storage.redact("s3://AKIA:wJal/rXUt+n@bucket/x") == "s3://***@bucket/x"
    assert storage.redact("'s3://AKIA:se@cr:et/pa@bucket/x'") == "'s3://***@bucket/x'"
    assert storage.redact("postgresql://u:pa/ss@host:5432/db") == "postgresql://***@host:5432/db"
    assert storage.redact("s3://bucket/key@v1 and s3://bucket/k") == "s3://bucket/key@v1 and s3://bucket/k"


def test_redact_removes_pieces_of_remembered_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.io import redaction

    monkeypatch.setattr(redaction, "_known", set())
    redaction.remember(["--address", "http://alice:pass/word@head:8265"])
    # What a URL parser quotes after splitting the URI at its first "/": neither a URI nor a whole secret.
    assert (
        storage.redact("Failed to parse: 'alice:pass' is not a valid port")
        == "Failed to parse: '***' is not a valid port"
    )
    assert storage.redact("got word, and pass") == "got ***, and ***"
    assert storage.redact("a class of its own") == "a class of its own"
