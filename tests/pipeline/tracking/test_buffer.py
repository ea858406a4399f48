"""pipeline.tracking.buffer: what waits through an outage is sent in order, once, and kept on a failure."""

from __future__ import annotations

import logging

import pytest

from pipeline.tracking.buffer import METRICS_PER_BATCH, OutageBuffer, Point


class Store:
    """Records batches; fails the ``fail_at``-th metrics batch (1-based) once."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.params: dict[str, str] = {}
        self.points: list[Point] = []
        self.batches = 0
        self.fail_at = fail_at

    def send_params(self, params: dict[str, str]) -> None:
        self.params.update(params)

    def send_metrics(self, points: list[Point]) -> None:
        self.batches += 1
        if self.batches == self.fail_at:
            raise ConnectionError("store down")
        self.points.extend(points)


def test_a_failed_batch_and_everything_after_it_are_kept_in_order() -> None:
    buffer = OutageBuffer()
    for step in range(2 * METRICS_PER_BATCH + 5):
        buffer.add_metrics({"loss": float(step)}, step, timestamp_ms=step)
    store = Store(fail_at=2)
    with pytest.raises(ConnectionError):
        buffer.drain(store.send_params, store.send_metrics)
    assert [p.step for p in store.points] == list(range(METRICS_PER_BATCH))
    assert buffer.points[0].step == METRICS_PER_BATCH
    buffer.drain(store.send_params, store.send_metrics)
    assert [p.step for p in store.points] == list(range(2 * METRICS_PER_BATCH + 5)) and buffer.empty


def test_steps_a_resumed_run_holds_are_not_sent_again_and_the_oldest_go_beyond_the_limit() -> None:
    buffer = OutageBuffer(max_points=3)
    buffer.logged_through = {"loss": 4}
    for step in range(3, 9):
        buffer.add_metrics({"loss": 1.0, "lr": 0.1}, step, timestamp_ms=0)
    assert [(p.key, p.step) for p in buffer.points] == [("lr", 7), ("loss", 8), ("lr", 8)]
    assert buffer.dropped == 2 * 6 - 2 - 3  # 12 points, 2 already stored (loss 3, 4), 3 kept


def test_a_param_keeps_its_first_value(caplog: pytest.LogCaptureFixture) -> None:
    buffer = OutageBuffer()
    buffer.stored_params = {"train.lr": "0.01"}
    with caplog.at_level(logging.WARNING):
        buffer.add_params({"train.lr": "0.02", "train.seed": "0"})
        buffer.add_params({"train.seed": "0"})
    assert buffer.pending_params == {"train.seed": "0"}
    assert "train.lr keeps its first value '0.01'" in caplog.text
    store = Store()
    buffer.drain(store.send_params, store.send_metrics)
    assert store.params == {"train.seed": "0"}
    assert buffer.stored_params == {"train.lr": "0.01", "train.seed": "0"}
