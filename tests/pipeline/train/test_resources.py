"""A run's workers are checked against the cluster's nodes before Ray Train is asked to place them."""

from __future__ import annotations

import pytest

from pipeline.train.resources import (
    ResourceError,
    WorkerRequest,
    ensure_placeable,
    shortfall,
    workers_that_fit,
)

TWO_CPUS = [{"CPU": 2.0, "memory": 1e10}]


def test_workers_fit_per_node_not_by_the_sum() -> None:
    nodes = [{"CPU": 3.0}, {"CPU": 3.0}]
    assert workers_that_fit(WorkerRequest(3, 2.0), nodes) == 2  # 6 CPUs in all, but 2 free on no node
    assert shortfall(WorkerRequest(2, 2.0), nodes) is None
    message = shortfall(WorkerRequest(3, 2.0), nodes)
    assert message == (
        "run.num_workers=3 x run.cpus_per_worker=2 needs 6 CPUs, but the Ray cluster has 6 CPUs on 2 "
        "node(s), room for 2 such worker(s)"
    )


@pytest.mark.parametrize(
    ("request_", "placeable"),
    [
        (WorkerRequest(1, 2.0), True),
        (WorkerRequest(8, 1.0), False),
        (WorkerRequest(2, 0.5, driver_cpus=0.1), True),
        (WorkerRequest(1, 2.0, driver_cpus=0.1), False),  # a trial's driver needs its sliver too
        (WorkerRequest(1, 1.0, gpus=1.0), False),
    ],
)
def test_a_two_cpu_machine(request_: WorkerRequest, placeable: bool) -> None:
    assert (shortfall(request_, TWO_CPUS) is None) == placeable


def test_gpus_are_counted_when_asked_for() -> None:
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert shortfall(WorkerRequest(2, 1.0, gpus=1.0), nodes) is None
    assert "and 2 GPUs" in shortfall(WorkerRequest(3, 1.0, gpus=1.0), nodes)


def test_refused_at_once_without_a_wait() -> None:
    expected = r"needs 8 CPUs, but the Ray cluster has 2 CPUs.*run\.resource_wait"
    with pytest.raises(ResourceError, match=expected):
        ensure_placeable(WorkerRequest(8, 1.0), nodes=lambda: TWO_CPUS, sleep=pytest.fail)


def test_waits_for_nodes_to_join_until_the_deadline() -> None:
    now = [0.0]
    joined = {"at": 12.0}

    def nodes() -> list[dict[str, float]]:
        return TWO_CPUS * (3 if now[0] >= joined["at"] else 1)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    demands: list[WorkerRequest | None] = []  # what the autoscaler was shown, then the withdrawal
    ensure_placeable(
        WorkerRequest(3, 2.0), wait=30, nodes=nodes, clock=lambda: now[0], sleep=sleep, demand=demands.append
    )
    assert 12.0 <= now[0] < 20.0  # returned soon after the nodes joined
    assert demands == [WorkerRequest(3, 2.0), None]

    now[0], joined["at"] = 0.0, 100.0
    with pytest.raises(ResourceError, match="after waiting 30 s"):
        ensure_placeable(
            WorkerRequest(3, 2.0),
            wait=30,
            nodes=nodes,
            clock=lambda: now[0],
            sleep=sleep,
            demand=demands.append,
        )
    assert now[0] == pytest.approx(30.0)
    assert demands[2:] == [WorkerRequest(3, 2.0), None]


def test_the_autoscaler_is_shown_one_bundle_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.autoscaler.sdk

    from pipeline.train.resources import ask_autoscaler

    asked: list[list[dict[str, float]]] = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: asked.append(bundles))
    ask_autoscaler(WorkerRequest(2, 4.0, gpus=1, driver_cpus=0.1))
    ask_autoscaler(None)
    assert asked == [[{"CPU": 4.0, "GPU": 1}, {"CPU": 4.0, "GPU": 1}, {"CPU": 0.1}], []]
