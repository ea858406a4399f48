"""Connecting to Ray (:func:`connect`, once per process) and whether a run's workers fit the cluster,
checked before Ray Train is asked to place them.

Ray Train waits for resources it cannot get: a request for 8 workers on a 2-CPU machine retries its worker
group every 60 s, forever. So the driver compares the request with the cluster's alive nodes first and
refuses what cannot be placed, with both numbers, unless ``run.resource_wait`` gives an autoscaler that many
seconds to add nodes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import interrupts
from pipeline.config import Config
from pipeline.io import storage

log = logging.getLogger(__name__)

DEBUG_ENV = "CCNET_DEBUG"  # set by --debug for the Ray processes: their logging stays verbose
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch, read by its controller


class ResourceError(RuntimeError):
    """The cluster cannot hold the requested workers; the message gives what was asked and what is there."""


@dataclass(frozen=True)
class WorkerRequest:
    """``workers`` workers of ``cpus`` CPUs and ``gpus`` GPUs each (all on one node per worker), plus
    ``driver_cpus`` for a process that drives them (a search's trial), anywhere."""

    workers: int
    cpus: float
    gpus: float = 0.0
    driver_cpus: float = 0.0


def workers_that_fit(request: WorkerRequest, nodes: Sequence[dict[str, float]]) -> int:
    """How many of the request's workers the nodes (each a ``{"CPU": n, "GPU": m, ...}``) hold at once."""

    def per_node(node: dict[str, float]) -> int:
        counts = []
        for name, need in (("CPU", request.cpus), ("GPU", request.gpus)):
            if need > 0:
                counts.append(math.floor(node.get(name, 0.0) / need + 1e-9))
        return min(counts) if counts else request.workers

    return sum(per_node(node) for node in nodes)


def shortfall(request: WorkerRequest, nodes: Sequence[dict[str, float]]) -> str | None:
    """None when the request can be placed on ``nodes``, else one line saying what is missing."""
    total_cpus = sum(node.get("CPU", 0.0) for node in nodes)
    total_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    fit = workers_that_fit(request, nodes)
    need_cpus = request.workers * request.cpus + request.driver_cpus
    if fit >= request.workers and need_cpus <= total_cpus + 1e-9:
        return None
    asked = f"run.num_workers={request.workers} x run.cpus_per_worker={request.cpus:g}"
    if request.gpus:
        asked += f" and {request.gpus:g} GPU each"
    if request.driver_cpus:
        asked += f" (+{request.driver_cpus:g} CPU for the trial's driver)"
    have = f"{total_cpus:g} CPUs" + (f" and {total_gpus:g} GPUs" if request.gpus else "")
    return (
        f"{asked} needs {need_cpus:g} CPUs, but the Ray cluster has {have} on {len(nodes)} node(s), "
        f"room for {fit} such worker(s)"
    )


def alive_nodes() -> list[dict[str, float]]:
    """The resources of each alive node of the connected Ray cluster."""
    import ray  # lazy: only a run with run.ray loads Ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def ask_autoscaler(request: WorkerRequest | None) -> None:
    """Show the autoscaler the request (one bundle per worker, plus the driver's CPUs) so that it adds nodes
    while nothing else asks for them yet; None withdraws it. Without an autoscaler this does nothing."""
    from ray.autoscaler.sdk import request_resources  # lazy: only a run with run.ray loads Ray

    bundles: list[dict[str, float]] = []
    if request is not None:
        worker = {"CPU": request.cpus, **({"GPU": request.gpus} if request.gpus else {})}
        bundles = [dict(worker) for _ in range(request.workers)]
        bundles += [{"CPU": request.driver_cpus}] if request.driver_cpus else []
    request_resources(bundles=bundles)


def ensure_placeable(
    request: WorkerRequest,
    wait: float = 0.0,
    nodes: Callable[[], list[dict[str, float]]] = alive_nodes,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = time.sleep,
    demand: Callable[[WorkerRequest | None], None] = ask_autoscaler,
) -> None:
    """Return once the cluster can hold ``request``; raise :class:`ResourceError` when it cannot, after
    waiting up to ``wait`` seconds for nodes to join. While it waits, ``demand`` shows the request to the
    autoscaler (nothing else asks for the workers before Ray Train does), and withdraws it at the end."""
    deadline = clock() + wait
    missing = shortfall(request, nodes())
    if missing and wait > 0:
        log.info("waiting up to %.0f s for the cluster to grow: %s", wait, missing)
        demand(request)
        try:
            while missing and clock() < deadline:
                sleep(min(5.0, max(deadline - clock(), 0.0)))
                missing = shortfall(request, nodes())
        finally:
            demand(None)  # Ray Train's own placement group holds the nodes from here
    if missing:
        hint = (
            f"after waiting {wait:g} s (run.resource_wait)"
            if wait > 0
            else "lower them, or set run.resource_wait=SECONDS to wait for an autoscaler"
        )
        raise ResourceError(f"{missing}; {hint}")


def worker_request(config: Config, driver_cpus: float = 0.0) -> WorkerRequest:
    """What the run's worker group asks Ray for (``driver_cpus``: a search trial's own process)."""
    run = config.run
    return WorkerRequest(run.num_workers, run.cpus_per_worker, 1.0 if run.use_gpu else 0.0, driver_cpus)


def ray_log_level() -> str:
    """Ray's own log level: ERROR, or INFO when the command runs with ``--debug``."""
    return "INFO" if logging.getLogger().isEnabledFor(logging.DEBUG) else "ERROR"


def _init_quietly() -> None:
    """``ray.init`` with Ray's own logs at ERROR in every process (INFO and up with ``--debug``): its
    controller and placement-group helpers otherwise fill the console with internal notices. The driver's
    logging is put back as it was (Ray's configuration also applies to the driver's root logger)."""

    import ray  # lazy: only a run with run.ray loads Ray

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    if ray_log_level() == "INFO":
        os.environ[DEBUG_ENV] = "1"  # workers and trials inherit it
    # A Ray instance started here runs on this machine alone, which no one preempts while the driver lives:
    # Ray Train's preemption watcher has nothing to watch there, and starting its actor prints a C++ notice
    # in every run. Ray's processes take the environment as it is while ray.init starts them; a cluster that
    # ray.init joins instead keeps its own setting, and so does a user who set the variable.
    watcher_off = PREEMPTION_WATCHER_ENV not in os.environ
    if watcher_off:
        os.environ[PREEMPTION_WATCHER_ENV] = "0"
    try:
        ray.init(
            include_dashboard=False,
            log_to_driver=True,
            logging_config=ray.LoggingConfig(log_level=ray_log_level()),
        )
    finally:
        if watcher_off:
            del os.environ[PREEMPTION_WATCHER_ENV]
        interrupts.reinstall()  # SIGTERM stops the command as Ctrl-C does, not through Ray's abort
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def connect(config: Config, driver_cpus: float = 0.0) -> None:
    """Start (or join) Ray and check that the run's workers fit the cluster: call it before anything is
    written, so a request that cannot be placed is refused with both numbers instead of waiting forever."""

    import ray  # lazy: only a run with run.ray loads Ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        _init_quietly()
    ensure_placeable(worker_request(config, driver_cpus), wait=config.run.resource_wait)
    warn_if_node_local(config.run.storage, alive_nodes())


def warn_if_node_local(run_storage: str, nodes: list[dict[str, float]]) -> bool:
    """A local ``run.storage`` on a cluster of several nodes: each worker writes checkpoints to its own node's
    disk, and a run resumed elsewhere (a lost node) finds none. One WARNING (right only for a folder shared
    at the same path on every node, NFS for example); returns whether it warned."""
    if storage.is_s3(run_storage) or len(nodes) < 2:
        return False
    log.warning(
        "run.storage=%s is a local folder but the Ray cluster has %d nodes: checkpoints written on "
        "one node are lost with it; use s3://... (or a folder shared at the same path on every node)",
        run_storage,
        len(nodes),
    )
    return True
