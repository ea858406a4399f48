"""What a tracker accepted and the store has not stored yet, kept in order through an outage.

Metric points keep their original step and time; params wait beside them. :meth:`OutageBuffer.drain` hands
them to the store in MLflow's batch sizes and forgets each batch once it is sent, so a failure part-way
leaves exactly what was not stored.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

log = logging.getLogger(__name__)

PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
METRICS_PER_BATCH = 1000
MAX_BUFFERED = 100_000  # metric points held during an outage (~10 MB); the oldest go first beyond that


class Point(NamedTuple):
    key: str
    value: float
    timestamp_ms: int
    step: int


class OutageBuffer:
    """Params and metric points waiting for the store.

    Attributes:
        stored_params: the params the run holds (a param never changes once stored).
        logged_through: a continued run's last stored step per metric; older steps are not sent again.
        dropped: metric points given up because more than ``max_points`` waited.
    """

    def __init__(self, max_points: int = MAX_BUFFERED) -> None:
        self.max_points = max_points
        self.stored_params: dict[str, str] = {}
        self.pending_params: dict[str, str] = {}
        self.points: deque[Point] = deque()
        self.logged_through: dict[str, int] = {}
        self.dropped = 0

    @property
    def empty(self) -> bool:
        return not (self.pending_params or self.points)

    def add_params(self, params: dict[str, str]) -> None:
        """Queues params not stored yet; a known key keeps its first value (with a warning if it differs)."""
        for key, text in params.items():
            known = self.pending_params.get(key, self.stored_params.get(key))
            if known is None:
                self.pending_params[key] = text
            elif known != text:
                log.warning(
                    "param %s keeps its first value %r (MLflow never changes a param; new: %r)",
                    key,
                    known,
                    text,
                )

    def add_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        """Queues metric points; steps the run already holds are skipped (a resumed run repeats the steps
        after its checkpoint), and beyond ``max_points`` the oldest are dropped."""
        for key, value in metrics.items():
            if step <= self.logged_through.get(key, -1):
                continue
            self.points.append(Point(key, float(value), timestamp_ms, int(step)))
        while len(self.points) > self.max_points:
            self.points.popleft()
            self.dropped += 1

    def drain(
        self, send_params: Callable[[dict[str, str]], None], send_metrics: Callable[[list[Point]], None]
    ) -> None:
        """Sends pending params, then points in order, batch by batch; raises what a sender raises, keeping
        everything from the failed batch on."""
        while self.pending_params:
            batch = dict(list(self.pending_params.items())[:PARAMS_PER_BATCH])
            send_params(batch)
            self.stored_params.update(batch)
            for key in batch:
                del self.pending_params[key]
        while self.points:
            points = [self.points[i] for i in range(min(METRICS_PER_BATCH, len(self.points)))]
            send_metrics(points)
            for _ in points:
                self.points.popleft()
