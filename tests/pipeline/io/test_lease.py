"""The run lease (pipeline/io/lease.py) and the compare-and-swap writes under it, on a local folder and on a
real S3 server (SeaweedFS): one owner at a time, dead owners taken over, a lost lease noticed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.io import storage
from pipeline.io.errors import PreconditionFailed
from pipeline.io.lease import LEASE_FILE, LeaseHeld, RunLease


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def prefix(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A run's storage prefix on a local folder or on the real S3 server."""
    if request.param == "local":
        return str(tmp_path / "runs" / "a-run")
    s3_env = request.getfixturevalue("s3_env")
    storage.ensure_bucket(s3_env)
    return storage.join(s3_env, "runs", "a-run")


def _forge(prefix: str, **fields: Any) -> None:
    """A lease file written by some other writer."""
    lease = {
        "id": "someone-else",
        "host": socket.gethostname(),
        "pid": 1,
        "command": "ccnet train",
        "started": time.time() - 60,
        "expires": time.time() + 600,
    } | fields
    storage.write_bytes(storage.join(prefix, LEASE_FILE), json.dumps(lease).encode())


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_write_if_is_a_compare_and_swap(prefix: str) -> None:
    uri = storage.join(prefix, "object.json")
    first = storage.write_if(uri, b"one", None)
    with pytest.raises(PreconditionFailed):
        storage.write_if(uri, b"two", None)  # it exists now
    second = storage.write_if(uri, b"two", first)
    with pytest.raises(PreconditionFailed):
        storage.write_if(uri, b"three", first)  # stale version
    assert storage.read_versioned(uri) == (b"two", second)
    assert not storage.delete_if(uri, first) and storage.exists(uri)
    assert storage.delete_if(uri, second) and not storage.exists(uri)
    assert storage.read_versioned(uri) is None and not storage.delete_if(uri, second)


def test_racing_creators_have_one_winner(prefix: str) -> None:
    uri = storage.join(prefix, "race.json")
    storage.write_bytes(storage.join(prefix, "other"), b"")  # the prefix (and bucket) exist before the race
    start, outcomes = threading.Barrier(6), []

    def create(index: int) -> None:
        start.wait()
        try:
            storage.write_if(uri, str(index).encode(), None)
            outcomes.append(index)
        except PreconditionFailed:
            outcomes.append(None)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i in outcomes if i is not None]
    assert len(winners) == 1 and storage.read_bytes(uri) == str(winners[0]).encode()


def test_a_live_lease_keeps_a_second_writer_out(prefix: str) -> None:
    with RunLease(prefix, "run 'a-run'", ttl=30) as first:
        with pytest.raises(LeaseHeld) as info:
            RunLease(prefix, "run 'a-run'", ttl=30).acquire()
        message = str(info.value)
        assert "run 'a-run' is being written by" in message and f"pid {first.owner.pid}" in message
        assert socket.gethostname() in message and "\n" not in message
    assert not storage.exists(storage.join(prefix, LEASE_FILE))  # released: the name is free again
    with RunLease(prefix, "run 'a-run'", ttl=30):
        pass


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(prefix: str) -> None:
    _forge(prefix, pid=_dead_pid())
    with RunLease(prefix, "run 'a-run'", ttl=30) as lease:
        holder = json.loads(storage.read_bytes(storage.join(prefix, LEASE_FILE)))
        assert holder["id"] == lease.owner.id


def test_another_hosts_lease_holds_until_it_expires(prefix: str) -> None:
    _forge(prefix, host="another-host", pid=_dead_pid(), expires=time.time() + 600)
    with pytest.raises(LeaseHeld, match="on another-host since .* UTC; lease valid (599|600) s more"):
        RunLease(prefix, "run 'a-run'").acquire()
    _forge(prefix, host="another-host", expires=time.time() - 1)  # its owner stopped renewing it
    with RunLease(prefix, "run 'a-run'"):
        pass


def test_a_file_that_is_not_a_lease_is_taken_over(prefix: str) -> None:
    storage.write_bytes(storage.join(prefix, LEASE_FILE), b"not json")
    with RunLease(prefix, "run 'a-run'", ttl=30):
        pass


def test_the_owner_renews_and_notices_a_lost_lease(prefix: str) -> None:
    uri = storage.join(prefix, LEASE_FILE)
    lease = RunLease(prefix, "run 'a-run'", ttl=0.6).acquire()
    try:
        first = json.loads(storage.read_bytes(uri))["expires"]
        _wait_for(lambda: json.loads(storage.read_bytes(uri))["expires"] > first)  # renewed
        lease.check()
        _forge(prefix, host="another-host")  # someone broke in (a clock far off, a hand edit)
        _wait_for(lease.lost.is_set)
        with pytest.raises(LeaseHeld, match="took the lease over"):
            lease.check()
    finally:
        lease.release()
    assert json.loads(storage.read_bytes(uri))["host"] == "another-host"  # not ours to remove


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan")])
def test_a_nonsense_time_to_live_is_refused(ttl: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="time to live"):
        RunLease(str(tmp_path), "run 'x'", ttl=ttl)


def test_a_released_local_lease_leaves_no_file_behind(tmp_path: Path) -> None:
    prefix = tmp_path / "runs" / "a-run"
    with RunLease(str(prefix), "run 'a-run'", ttl=30):
        assert os.listdir(prefix) == [LEASE_FILE]
    assert os.listdir(tmp_path) == []  # no lock file (the folder itself is locked), no folder it created
    prefix.mkdir(parents=True)
    (prefix / "checkpoint.pt").write_bytes(b"")
    with RunLease(str(prefix), "run 'a-run'", ttl=30):
        pass
    assert os.listdir(prefix) == ["checkpoint.pt"]  # what was there stays
