"""Ctrl-C (SIGINT) and SIGTERM (how Kubernetes, Ray and schedulers stop a process) end every command within
a bounded time, the same way.

The first signal raises KeyboardInterrupt as usual, so the command stops the way it chose (the MLflow run
marked KILLED, the lease released, one ERROR line, exit status 130 for SIGINT and 143 for SIGTERM). It also
starts a watchdog: if the process is still alive ``CCNET_INTERRUPT_GRACE_SECONDS`` (default 30) later, because
a library's own shutdown hangs (Ray Train's graceful abort of a worker group that never started waited 14
minutes), the callbacks registered with :func:`on_forced_exit` run (each bounded) and the process exits with
that status. A second signal exits at once the same way.

Code that must stop a library its own way (Ray Tune saves the search's state so it can be resumed) runs it
under :func:`deferred`: the signal calls the given function instead of raising, and KeyboardInterrupt is
raised when the block ends, whatever the library returned.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger("ccnet")

GRACE_ENV = "CCNET_INTERRUPT_GRACE_SECONDS"
_callbacks: list[Callable[[], None]] = []
_state: dict = {"interrupted": False, "exiting": False, "signal": None, "deferred": None, "installed": False}
NAMES: dict[int, str] = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def on_forced_exit(callback: Callable[[], None]) -> Callable[[], None]:
    """Runs ``callback`` (e.g. marking an MLflow run KILLED) if the process must be ended by force;
    returns a function that unregisters it."""
    _callbacks.append(callback)
    return lambda: _callbacks.remove(callback) if callback in _callbacks else None


def _grace() -> float:
    try:
        return max(0.0, float(os.environ.get(GRACE_ENV, "30")))
    except ValueError:
        return 30.0


def _force_exit(reason: str) -> None:
    if _state["exiting"]:
        return
    _state["exiting"] = True
    log.error("%s; exiting now", reason)
    for callback in list(_callbacks):
        worker = threading.Thread(target=callback, daemon=True)
        worker.start()
        worker.join(timeout=5.0)  # a callback stuck on a dead server does not hold the exit
    sys.stderr.flush()
    os._exit(exit_status())


def received() -> str:
    """How the process was interrupted: "Ctrl-C" or "SIGTERM" (Ctrl-C when no signal was seen)."""
    return NAMES.get(_state["signal"], "Ctrl-C")


def exit_status() -> int:
    """The shell's status for the signal that interrupted the process: 130 (SIGINT) or 143 (SIGTERM)."""
    return 128 + int(_state["signal"] or signal.SIGINT)


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state["interrupted"]:
        _force_exit(f"interrupted again ({NAMES.get(signum, signum)})")
    _state["interrupted"], _state["signal"] = True, signum
    grace = _grace()
    timer = threading.Timer(grace, _force_exit, args=(f"still stopping {grace:.0f} s after {received()}",))
    timer.daemon = True
    timer.start()
    if _state["deferred"] is not None:
        _state["deferred"]()
        return
    raise KeyboardInterrupt


@contextmanager
def deferred(stop: Callable[[], None]) -> Iterator[None]:
    """Within the block a signal calls ``stop`` (which asks the library to stop its way) instead of raising;
    KeyboardInterrupt is raised when the block ends, however it ended. The watchdog runs as always."""
    _state["deferred"] = stop
    try:
        yield
    finally:
        _state["deferred"] = None
    if _state["interrupted"]:
        raise KeyboardInterrupt


def install() -> None:
    """Installs the bounded handler for SIGINT and SIGTERM (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        for signum in NAMES:
            signal.signal(signum, _handler)
        _state["installed"] = True


def reinstall() -> None:
    """Puts the handler back after a library replaced it (``ray.init`` installs Ray's fatal-signal handler
    for SIGTERM, which aborts the process); a no-op where :func:`install` was never called."""
    if _state["installed"]:
        install()
