"""A node lost while a Ray Tune search runs two trials at once, one on each worker node.

The cluster of ``test_node_loss.py`` (``node_loss_helpers``: a head with no CPU, as the head pod of
``infra/k8s``, and two worker nodes of one CPU). The search is a grid of two seeds, each trial one Ray Train
worker of 0.6 CPU plus 0.1 CPU for the trial's own process (its driver, a Tune actor, with Ray Train's
controller pinned to its node). A worker node holds one worker (two would need 1.2 CPUs), so the two trials'
workers land on the two nodes, read back from Ray's actor table; the drivers go where Ray places them (the
head has no CPU: on a worker node, next to a worker, as on a real cluster).

At a randomly chosen checkpoint ``node_b`` is removed at once and a replacement node added. What it hosted
decides what recovers: a lost worker alone is restarted by Ray Train (``run.max_failures``) inside its trial;
a lost trial driver (with its controller, whose worker on the other node goes with it) is restarted by Tune
(the same ``run.max_failures``), and the trial's new TorchTrainer resumes the same run from S3. Both trials
must end with the weights of an uninterrupted search's trials of the same seed, every planned checkpoint
registered once (but those a lost controller never registered: see the test), and MLflow must hold one
parent run and one nested run per trial, each step once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from node_loss_helpers import (
    EVERY,
    ITERATIONS,
    TRIAL,
    WORKER,
    actors,
    checkpoint_folders,
    final_model,
    lose_a_node,
    registered,
    run_settings,
    three_node_cluster,
)

from pipeline.config import Config, load_config
from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards
from pipeline.io import storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]
log = logging.getLogger(__name__)

SEEDS = (0, 1)


@pytest.fixture
def cluster(s3_env: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The three-node cluster (``node_loss_helpers``), started after ``s3_env``."""
    with three_node_cluster() as started:
        yield started


def _config(data: str, runs: str, name: str, tracking: str) -> Config:
    """A grid of one variant (the preset as it is) and two seeds, both trials at once, each to its end; the
    search and its MLflow experiment are both called ``name``."""
    return load_config(
        None,
        [
            *run_settings(data, runs, tracking),
            "run.num_workers=1",
            "run.cpus_per_worker=0.6",
            f"tracking.experiment={name}",
            f"tune.name={name}",
            "tune.space={}",
            "tune.scheduler=none",
            "tune.variants={cc: []}",
            f"tune.seeds=[{', '.join(map(str, SEEDS))}]",
            f"tune.max_concurrent={len(SEEDS)}",
        ],
    )


def _trial_folders(runs: str, name: str) -> dict[int, str]:
    """Each seed's run folder: a grid trial's run is named ``<tune.name>_<variant>_seed<seed>``."""
    return {seed: storage.join(runs, f"{name}_cc_seed{seed}") for seed in SEEDS}


def _driver_of(worker: dict[str, Any], table: dict[str, dict[str, Any]]) -> str:
    """The trial driver that a Train worker works for: the worker's owner is its run's TrainController, whose
    owner is the trial's driver (actors are matched by the node and port of their process)."""
    by_process = {
        (info["Address"]["NodeID"], info["Address"]["Port"]): actor_id for actor_id, info in table.items()
    }

    def owner(info: dict[str, Any]) -> str:
        return by_process[(info["OwnerAddress"]["NodeID"], info["OwnerAddress"]["Port"])]

    driver = owner(table[owner(worker)])
    assert table[driver]["ActorClassName"] == TRIAL, table[driver]
    return driver


def test_a_lost_node_during_a_search_resumes_each_trial(
    cluster: tuple[Any, dict[str, Any]], s3_env: str, mlflow_server: Any
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.train.tune import run_search

    ray_cluster, nodes = cluster
    source = build_source("generated", None, image_size=(48, 48), counts={"train": 16, "val": 2})
    data, _ = write_shards(source, storage.join(s3_env, "datasets"), workers=1, progress=False)
    runs = storage.join(s3_env, "runs")

    started = time.monotonic()
    run_search(_config(data, runs, "reference", mlflow_server.uri))
    reference_s = time.monotonic() - started
    reference = {seed: final_model(folder) for seed, folder in _trial_folders(runs, "reference").items()}
    before = set(actors())

    seed = random.randrange(2**32)
    after = random.Random(seed).randint(1, ITERATIONS // EVERY // 2 - 1)
    log.warning("fault: node_b removed once every trial has %d checkpoints (seed %d)", after, seed)
    folders = _trial_folders(runs, "lost-node")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        searching = pool.submit(run_search, _config(data, runs, "lost-node", mlflow_server.uri))
        record = lose_a_node(ray_cluster, nodes, list(folders.values()), after, searching)
        report = searching.result(timeout=600)
    table = {actor_id: info for actor_id, info in actors().items() if actor_id not in before}
    ids = record["node_ids"]
    at_kill = {actor_id: table[actor_id] for actor_id in record["alive_at_kill"] if actor_id in table}
    on_b = {
        actor_id
        for actor_id, info in at_kill.items()
        if info["Address"]["NodeID"] == ids["node_b"] and info["ActorClassName"] in (TRIAL, WORKER)
    }
    fault = {key: value for key, value in record.items() if key not in ("alive_at_kill", "node_ids")}
    fault |= {"seed": seed, "node_b_hosted": sorted(at_kill[actor_id]["ActorClassName"] for actor_id in on_b)}
    log.warning(
        "uninterrupted search %.0f s, search with a lost node %.0f s; %s",
        reference_s,
        time.monotonic() - started,
        fault,
    )
    assert "remove_error" not in record, fault
    assert max(record["checkpoints_at_kill"].values()) < ITERATIONS // EVERY, fault

    # The two trials' workers ran on the two worker nodes.
    workers = {actor_id for actor_id, info in at_kill.items() if info["ActorClassName"] == WORKER}
    assert {at_kill[actor_id]["Address"]["NodeID"] for actor_id in workers} == {ids["node_a"], ids["node_b"]}
    # What recovered: Tune started a new driver for each trial whose driver was lost; each trial that lost its
    # worker or its driver started one new worker group (Ray Train's restart, or the restarted trial's), away
    # from the lost node. The other trial's worker went on undisturbed.
    lost_drivers = {actor_id for actor_id in on_b if at_kill[actor_id]["ActorClassName"] == TRIAL}
    hit = lost_drivers | {_driver_of(at_kill[actor_id], table) for actor_id in workers & on_b}
    later = {
        actor_id: info
        for actor_id, info in table.items()
        if actor_id not in at_kill and info["ActorClassName"] in (TRIAL, WORKER)
    }
    restarted = [info["ActorClassName"] for info in later.values()]
    assert restarted.count(TRIAL) == len(lost_drivers), (restarted, fault)
    assert restarted.count(WORKER) == len(hit), (restarted, fault)
    assert all(info["Address"]["NodeID"] != ids["node_b"] for info in later.values()), fault

    # Both trials finished, with their final results, and the ablation table counts both seeds.
    rows = report.table.splitlines()[2:]
    assert len(rows) == len(SEEDS) and all(row.endswith(f"| {ITERATIONS} |") for row in rows), report.table
    assert all(" | - | " not in row for row in rows), report.table
    assert report.ablation.splitlines()[2].endswith("| 0,1 |"), report.ablation

    # Each trial resumed from S3: bit-equal to the uninterrupted trial of its seed, its checkpoints registered
    # once each and no other left in S3. A trial whose driver was lost lost its Ray Train controller too, and
    # with it the registration of what its worker wrote since the controller's last look: the restarted trial
    # resumes from the newest such checkpoint and removes them once past them (``unregistered_checkpoints``),
    # so only such a trial may miss planned checkpoints (logged).
    planned = list(range(EVERY, ITERATIONS + 1, EVERY))
    missing = {}
    for trial_seed, folder in folders.items():
        final = final_model(folder)
        assert final.keys() == reference[trial_seed].keys()
        for key, value in reference[trial_seed].items():
            assert torch.equal(final[key], value), f"seed {trial_seed}: {key} differs; {fault}"
        iterations = sorted(registered(folder))
        once = sorted(set(iterations) & set(planned))  # each registered once, each one planned
        assert iterations == once and iterations[-1] == ITERATIONS, (trial_seed, iterations, fault)
        assert len(checkpoint_folders(folder)) == len(iterations), (trial_seed, fault)
        if iterations != planned:
            missing[trial_seed] = sorted(set(planned) - set(iterations))
    log.warning("planned checkpoints never registered, by seed: %s", missing)
    assert len(missing) <= len(lost_drivers), (missing, fault)

    # MLflow: the parent run and one nested run per trial, all finished, each step of the loss curve once.
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("lost-node")
    found = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in found if "mlflow.parentRunId" not in run.data.tags] == [
        report.parent_run_id
    ]
    children = [run for run in found if run.data.tags.get("mlflow.parentRunId") == report.parent_run_id]
    assert len(found) == 1 + len(SEEDS), [(run.info.run_name, run.info.status) for run in found]
    assert sorted(run.info.run_name for run in children) == [f"lost-node_cc_seed{s}" for s in SEEDS]
    assert {run.info.status for run in found} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(EVERY, ITERATIONS + 1, EVERY)), (child.info.run_name, steps, fault)
