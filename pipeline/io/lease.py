"""One writer per run: a lease object in the run's storage that a second writer sees before it writes.

``<storage>/<name>/run.lease`` (JSON) names its owner (a random id, host, pid, command) and an expiry. The
owner renews it from a background thread every third of its time to live; a second ``ccnet train`` (or
``ccnet tune``) with the same name finds a live lease and stops with one line naming the run and the owner,
before it touches MLflow or the checkpoints. A lease whose owner died is taken over: at once when the
owner ran on this host and its process is gone, else once it has expired (after ``run.lease_ttl`` s).

Every write of the lease is a compare-and-swap (:func:`pipeline.io.storage.write_if`: S3 conditional puts,
``flock`` locally), so two writers racing for an expired lease cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pipeline.io import storage
from pipeline.io.errors import PreconditionFailed
from pipeline.io.paths import parse_location

log = logging.getLogger(__name__)

# Not "*.json": Ray Tune's restore copies every .json/.pkl file of the experiment folder (the search's run
# folder) to its staging folder and uploads them back later, which rewrote a resumed search's lease and made
# it look taken over.
LEASE_FILE = "run.lease"


class LeaseHeld(RuntimeError):
    """Another live writer owns the run; the message is one line naming the run and the owner."""


@dataclass(frozen=True)
class Owner:
    id: str
    host: str
    pid: int
    command: str
    started: float  # seconds since the epoch
    expires: float

    @classmethod
    def me(cls, ttl: float) -> Owner:
        subcommand = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")
        now = time.time()
        return cls(
            uuid.uuid4().hex, socket.gethostname(), os.getpid(), f"ccnet {subcommand}".strip(), now, now + ttl
        )

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        left = max(self.expires - time.time(), 0)
        return (
            f"{self.command} (pid {self.pid} on {self.host} since {since}; "
            f"lease valid {left:.0f} s more unless renewed)"
        )

    def is_dead(self, now: float) -> bool:
        """Expired, or its process on this host is gone (a pid check is only meaningful here)."""
        if now >= self.expires:
            return True
        return self.host == socket.gethostname() and not _process_alive(self.pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _decode(data: bytes, uri: str) -> Owner | None:
    """The owner recorded in a lease file; None for a file that is not a lease (taken over as dead)."""
    try:
        fields = json.loads(data)
        return Owner(
            str(fields["id"]),
            str(fields["host"]),
            int(fields["pid"]),
            str(fields["command"]),
            float(fields["started"]),
            float(fields["expires"]),
        )
    except (ValueError, KeyError, TypeError):
        log.warning("%s is not a lease file: taking it over", storage.redact(uri))
        return None


class RunLease:
    """The lease of one run or search, held from :meth:`acquire` to :meth:`release` (a context manager).

    Args:
        prefix: the run's storage prefix (``<run.storage>/<run.name>``).
        name: what the error message calls it, e.g. ``run 'ccnet_tiny-r2'``.
        ttl: seconds a lease stays valid without renewal.
    """

    def __init__(self, prefix: str, name: str, ttl: float = 60.0) -> None:
        if not 0 < ttl < math.inf:
            raise ValueError(f"lease time to live must be > 0 s, got {ttl}")
        self.uri = storage.join(prefix, LEASE_FILE)
        self.name = name
        self.ttl = ttl
        self.owner = Owner.me(ttl)
        self.lost = threading.Event()  # set when another writer took the lease over
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created: list[Path] = []

    def _payload(self) -> bytes:
        fields = {**self.owner.__dict__, "expires": time.time() + self.ttl}
        return json.dumps(fields, sort_keys=True).encode()

    def acquire(self) -> RunLease:
        """Takes the lease or raises LeaseHeld naming the live owner; starts the renewal thread."""
        if storage.is_s3(self.uri):
            storage.ensure_bucket(self.uri)
        else:  # folders this lease creates, removed again on release if nothing else was written there
            folder = Path(parse_location(self.uri).path).parent.absolute()
            while not folder.exists():
                self._created.append(folder)
                folder = folder.parent
        current = storage.read_versioned(self.uri)
        if current is not None:
            holder = _decode(current[0], self.uri)
            if holder is not None and not holder.is_dead(time.time()):
                raise LeaseHeld(
                    f"{self.name} is being written by {holder.describe()}: "
                    f"wait for it to end, or use another name ({storage.redact(self.uri)})"
                )
            if holder is not None:
                log.info("%s: taking over the lease of %s, which is gone", self.name, holder.describe())
        payload = self._payload()
        try:
            self._version = storage.write_if(self.uri, payload, current[1] if current else None)
        except PreconditionFailed:
            # Another writer won the race, or a retried put of ours had already landed: read who holds it.
            current = storage.read_versioned(self.uri)
            holder = _decode(current[0], self.uri) if current else None
            if current is None or holder is None or holder.id != self.owner.id:
                named = holder.describe() if holder else "another writer"
                raise LeaseHeld(
                    f"{self.name} is being written by {named}: wait for it to end, or use "
                    f"another name ({storage.redact(self.uri)})"
                ) from None
            self._version = current[1]
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._version = storage.write_if(self.uri, self._payload(), self._version)
            except PreconditionFailed:
                current = storage.read_versioned(self.uri)
                holder = _decode(current[0], self.uri) if current else None
                log.error(
                    "%s: lost its lease to %s; stop this process, its writes may mix with theirs",
                    self.name,
                    holder.describe() if holder else "nobody (the lease file was removed)",
                )
                self.lost.set()
                return
            except Exception as error:  # noqa: BLE001 - an outage: try again at the next tick
                log.warning("%s: could not renew the lease: %s", self.name, error)

    def check(self) -> None:
        """Raises LeaseHeld when the lease was lost (call it before publishing results)."""
        if self.lost.is_set():
            raise LeaseHeld(
                f"{self.name}: another writer took the lease over during the run; "
                f"its results were not published"
            )

    def release(self) -> None:
        """Stops renewing and removes the lease if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._version is not None and not self.lost.is_set():
            try:
                storage.delete_if(self.uri, self._version)
            except Exception as error:  # noqa: BLE001 - it expires on its own
                log.warning(
                    "%s: could not remove the lease (it expires in %.0f s): %s", self.name, self.ttl, error
                )
        self._version = None
        for folder in self._created:  # deepest first; a folder that holds anything stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created = []

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
