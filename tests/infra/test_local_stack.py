"""The local stack (``infra/local/stack.py``): up on free ports in a short tmp dir, every service answers on
127.0.0.1 and listens nowhere else, S3 and MLflow work with the generated credentials, and ``down`` leaves no
process and no open port behind."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack_helpers import alive, port_open, run_stack, running_stack, stack_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.setdefault(int(port, 16), []).append(ipaddress.ip_address(raw))
    return found


def _is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Path, dict[str, int]]]:
    with running_stack() as up:
        yield up


def test_status_is_healthy_and_up_is_idempotent(stack: tuple[Path, dict[str, int]]) -> None:
    root, ports = stack
    before = json.loads((root / "pids.json").read_text())
    status = run_stack(root, "status")
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("healthy") == 3 and "unhealthy" not in status.stdout
    again = run_stack(root, "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == 3
    assert json.loads((root / "pids.json").read_text()) == before


def test_services_listen_on_loopback_only(stack: tuple[Path, dict[str, int]]) -> None:
    root, ports = stack
    listeners = _listeners(stack_pids(root, json.loads((root / "pids.json").read_text())))
    # The check must see the ports that matter, or it proves nothing.
    assert {ports[name] for name in ("s3", "mlflow", "ray.gcs", "ray.dashboard")} <= listeners.keys()
    exposed = {
        port: [str(a) for a in addresses]
        for port, addresses in listeners.items()
        if not all(_is_loopback(a) for a in addresses)
    }
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
        "s3",
        endpoint_url=f"http://127.0.0.1:{ports['s3']}",
        region_name="us-east-1",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
    )
    client.put_object(Bucket="ccnet", Key="test/hello.txt", Body=b"hello")
    assert client.get_object(Bucket="ccnet", Key="test/hello.txt")["Body"].read() == b"hello"
    wrong = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{ports['s3']}",
        region_name="us-east-1",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key="not-the-secret",
    )
    with pytest.raises(wrong.exceptions.ClientError):
        wrong.get_object(Bucket="ccnet", Key="test/hello.txt")


def test_mlflow_run_with_artifact_in_s3(
    stack: tuple[Path, dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
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

    keys = dict(
        line.removeprefix("export ").split("=", 1)
        for line in (root / "credentials.env").read_text().splitlines()
    )
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{ports['s3']}",
        region_name="us-east-1",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
    )
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
    running = stack_pids(root, pids)
    assert running >= {entry["pid"] for entry in pids.values()}
    result = run_stack(root, "down")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (root / "pids.json").exists()
    assert not [pid for pid in running if alive(pid)]
    assert not stack_pids(root, pids)
    assert not [name for name, port in ports.items() if port_open(port)]
    assert (root / "mlflow.db").exists() and (root / "credentials.env").exists()  # data stays
    assert run_stack(root, "status").returncode == 1
