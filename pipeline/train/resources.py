"""Whether a run's workers fit the Ray cluster, checked before Ray Train is asked to place them.

Ray Train waits for resources it cannot get: a request for 8 workers on a 2-CPU machine retries its worker
group every 60 s, forever. So the driver compares the request with the cluster's alive nodes first and
refuses what cannot be placed, with both numbers, unless ``run.resource_wait`` gives an autoscaler that many
seconds to add nodes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


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
    return (f"{asked} needs {need_cpus:g} CPUs, but the Ray cluster has {have} on {len(nodes)} node(s), "
            f"room for {fit} such worker(s)")


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
        hint = (f"after waiting {wait:g} s (run.resource_wait)" if wait > 0
                else "lower them, or set run.resource_wait=SECONDS to wait for an autoscaler")
        raise ResourceError(f"{missing}; {hint}")
