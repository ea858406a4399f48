"""The local stack (``infra/local/stack.py``): up on free ports in a short tmp dir, every service answers on
127.0.0.1 and listens nowhere else, S3 and MLflow work with the generated credentials, and ``down`` leaves no
process and no open port behind."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "local" / "stack.py"
SCRIPTS = Path(sysconfig.get_path("scripts"))
WEED_PORTS = ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc")
OTHER_PORTS = ("mlflow", "ray.gcs", "ray.dashboard", "ray.client", "ray.agent", "ray.metrics",
               "ray.autoscaler_metrics", "ray.dashboard_metrics")


def _free_admin_pair(avoid: set[int]) -> tuple[int, int]:
    """weed's worker dials the admin port + 10000 whatever -admin.port.grpc says: both must be free."""
    for _ in range(100):
        port = secrets.choice(range(20000, 55535))
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        if not {port, port + 10000} & avoid:
            return port, port + 10000
    raise RuntimeError("no free pair of ports")


def _run(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--dir", str(root)], capture_output=True,
                          text=True, timeout=timeout)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stack_pids(root: Path, pids: dict[str, dict]) -> set[int]:
    """Every live process of the stack: the recorded process groups and whatever names Ray's temp dir."""
    groups, found = {entry["pid"] for entry in pids.values()}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if fields[0] != "Z" and (int(fields[3]) in groups or str(root / "ray") in cmdline):
                found.add(int(entry.name))
    return found


def _listeners(pids: set[int]) -> dict[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Listening TCP sockets owned by ``pids``: port -> local addresses (from /proc/net/tcp{,6})."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found: dict[int, list] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.setdefault(int(port, 16), []).append(ipaddress.ip_address(raw))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Path, dict[str, int]]]:
    """The stack, up on free ports in a short dir under /tmp (Ray's socket paths are length-limited)."""
    if not all((SCRIPTS / name).exists() for name in ("weed", "mlflow", "ray")):
        pytest.skip("the venv lacks weed, mlflow or ray")
    root = Path(tempfile.mkdtemp(prefix="ccnet-stack-", dir="/tmp"))
    names = WEED_PORTS + OTHER_PORTS
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    ports["admin"], ports["admin.grpc"] = _free_admin_pair(set(ports.values()))
    result = _run(root, "up", *(f"--port={name}={port}" for name, port in ports.items()))
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield root, ports
    finally:
        if (root / "pids.json").exists():  # a test failed before `down`
            _run(root, "down")
        shutil.rmtree(root, ignore_errors=True)


def test_status_is_healthy_and_up_is_idempotent(stack: tuple[Path, dict[str, int]]) -> None:
    root, ports = stack
    before = json.loads((root / "pids.json").read_text())
    status = _run(root, "status")
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("healthy") == 3 and "unhealthy" not in status.stdout
    again = _run(root, "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == 3
    assert json.loads((root / "pids.json").read_text()) == before


def test_services_listen_on_loopback_only(stack: tuple[Path, dict[str, int]]) -> None:
    root, ports = stack
    listeners = _listeners(_stack_pids(root, json.loads((root / "pids.json").read_text())))
    # The check must see the ports that matter, or it proves nothing.
    assert {ports[name] for name in ("s3", "mlflow", "ray.gcs", "ray.dashboard")} <= listeners.keys()
    exposed = {port: [str(a) for a in addresses] for port, addresses in listeners.items()
               if not all(_is_loopback(a) for a in addresses)}
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"


def test_s3_with_generated_credentials(stack: tuple[Path, dict[str, int]]) -> None:
    import boto3

    root, ports = stack
    credentials = root / "credentials.env"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    keys = dict(line.removeprefix("export ").split("=", 1) for line in credentials.read_text().splitlines())
    env_sh = (root / "env.sh").read_text()
    assert keys["AWS_SECRET_ACCESS_KEY"] not in env_sh and f"http://127.0.0.1:{ports['s3']}" in env_sh
    client = boto3.session.Session().client(
        "s3", endpoint_url=f"http://127.0.0.1:{ports['s3']}", region_name="us-east-1",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
    client.put_object(Bucket="ccnet", Key="test/hello.txt", Body=b"hello")
    assert client.get_object(Bucket="ccnet", Key="test/hello.txt")["Body"].read() == b"hello"
    wrong = boto3.session.Session().client(
        "s3", endpoint_url=f"http://127.0.0.1:{ports['s3']}", region_name="us-east-1",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key="not-the-secret")
    with pytest.raises(wrong.exceptions.ClientError):
        wrong.get_object(Bucket="ccnet", Key="test/hello.txt")


def test_mlflow_run_with_artifact_in_s3(stack: tuple[Path, dict[str, int]],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from mlflow.tracking import MlflowClient

    root, ports = stack
    for name in [name for name in os.environ if name.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(name)  # artifacts must go through the server's proxy, not client credentials
    uri = f"http://127.0.0.1:{ports['mlflow']}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment(f"stack-{secrets.token_hex(4)}"))
    client.log_metric(run.info.run_id, "loss", 0.5)
    client.log_text(run.info.run_id, "hello", "note.txt")
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}

    keys = dict(line.removeprefix("export ").split("=", 1)
                for line in (root / "credentials.env").read_text().splitlines())
    s3 = boto3.session.Session().client(
        "s3", endpoint_url=f"http://127.0.0.1:{ports['s3']}", region_name="us-east-1",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
    listed = s3.list_objects_v2(Bucket="ccnet", Prefix="mlflow/")
    assert any(item["Key"].endswith(f"{run.info.run_id}/artifacts/note.txt") for item in listed["Contents"])


def test_ray_job_server_answers(stack: tuple[Path, dict[str, int]]) -> None:
    _, ports = stack
    url = f"http://127.0.0.1:{ports['ray.dashboard']}/api/jobs/"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read()) == []


def test_down_leaves_nothing_running(stack: tuple[Path, dict[str, int]]) -> None:
    root, ports = stack
    pids = json.loads((root / "pids.json").read_text())
    running = _stack_pids(root, pids)
    assert running >= {entry["pid"] for entry in pids.values()}
    result = _run(root, "down")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (root / "pids.json").exists()
    assert not [pid for pid in running if _alive(pid)]
    assert not _stack_pids(root, pids)
    assert not [name for name, port in ports.items() if _port_open(port)]
    assert (root / "mlflow.db").exists() and (root / "credentials.env").exists()  # data stays
    assert _run(root, "status").returncode == 1
