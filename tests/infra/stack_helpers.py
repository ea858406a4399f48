"""The local stack for tests: up on free ports in a short dir under /tmp, its processes, its environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.local.servers import free_port_pair, free_ports

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "local" / "stack.py"
SCRIPTS = Path(sysconfig.get_path("scripts"))
WEED_PORTS = ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc")
OTHER_PORTS = (
    "mlflow",
    "ray.gcs",
    "ray.dashboard",
    "ray.client",
    "ray.agent",
    "ray.metrics",
    "ray.autoscaler_metrics",
    "ray.dashboard_metrics",
)


def run_stack(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``infra/local/stack.py ARGS --dir ROOT``."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--dir", str(root)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def running_stack() -> Iterator[tuple[Path, dict[str, int]]]:
    """The stack, up on free ports in a short dir under /tmp (Ray's socket paths are length-limited); brought
    down and removed at the end if a test has not done it."""
    if not all((SCRIPTS / name).exists() for name in ("weed", "mlflow", "ray")):
        pytest.skip("the venv lacks weed, mlflow or ray")
    failures = []
    for _attempt in range(2):
        # The ports are free when chosen, but processes starting meanwhile (Ray's own workers and gRPC
        # servers take ephemeral ports) can take one first: a start-up that failed is retried once on others.
        root = Path(tempfile.mkdtemp(prefix="ccnet-stack-", dir="/tmp"))
        names = WEED_PORTS + OTHER_PORTS
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        # weed's worker dials the admin port + 10000 whatever -admin.port.grpc says: both must be free.
        ports["admin"], ports["admin.grpc"] = free_port_pair(10000, set(ports.values()))
        result = run_stack(root, "up", *(f"--port={name}={port}" for name, port in ports.items()))
        if result.returncode == 0:
            break
        failures.append(result.stdout + result.stderr + _log_tails(root))
        run_stack(root, "down")
        shutil.rmtree(root, ignore_errors=True)
    else:
        pytest.fail("\n".join(failures), pytrace=False)
    try:
        yield root, ports
    finally:
        if (root / "pids.json").exists():  # a test failed before `down`
            run_stack(root, "down")
        shutil.rmtree(root, ignore_errors=True)


def _log_tails(root: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of every service log under ``root`` (why a start-up failed)."""
    tails = []
    for log in sorted((root / "logs").glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(tails)


def stack_env(root: Path) -> dict[str, str]:
    """What ``source <root>/env.sh`` exports (credentials included)."""
    env = {}
    for path in (root / "credentials.env", root / "env.sh"):
        for line in path.read_text().splitlines():
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                env[name] = value
    return env


def port_open(port: int) -> bool:
    """Whether a socket LISTENs on ``port`` (read from /proc/net/tcp{,6}: connecting to a free port of the
    ephemeral range can connect a socket to itself)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                return True
    return False


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stack_pids(root: Path, pids: dict[str, dict]) -> set[int]:
    """Every live process of the stack: the recorded process groups, whatever names the stack's dir on its
    command line, and whatever runs in it (the drivers of submitted jobs run in Ray's job working dirs)."""
    groups, found = {entry["pid"] for entry in pids.values()}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        cwd = ""
        with contextlib.suppress(OSError):
            cwd = os.readlink(entry / "cwd")
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if fields[0] != "Z" and (
                int(fields[3]) in groups or str(root) in cmdline or cwd.startswith(str(root))
            ):
                found.add(int(entry.name))
    return found
