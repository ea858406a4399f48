"""Ctrl-C ends every command within a bounded time.

The first SIGINT raises KeyboardInterrupt as usual, so the command stops the way it chose (the MLflow run
marked KILLED, the lease released, one ERROR line). It also starts a watchdog: if the process is still alive
``CCNET_INTERRUPT_GRACE_SECONDS`` (default 30) later, because a library's own shutdown hangs (Ray Train's
graceful abort of a worker group that never started waited 14 minutes), the callbacks registered with
:func:`on_forced_exit` run (each bounded) and the process exits with status 130. A second Ctrl-C exits at once
the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("ccnet")

GRACE_ENV = "CCNET_INTERRUPT_GRACE_SECONDS"
_callbacks: list[Callable[[], None]] = []
_state = {"interrupted": False, "exiting": False}


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
    os._exit(130)


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state["interrupted"]:
        _force_exit("interrupted again (Ctrl-C)")
    _state["interrupted"] = True
    grace = _grace()
    timer = threading.Timer(grace, _force_exit, args=(f"still stopping {grace:.0f} s after Ctrl-C",))
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def install() -> None:
    """Installs the bounded Ctrl-C handler (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
