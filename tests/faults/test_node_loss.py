"""A node lost mid-run, on a Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``).

The cluster: a head that runs the driver and Ray Train's controller (no CPU for workers) and two worker nodes
of one CPU each, each advertising its own resource (``node_a``, ``node_b``). Two training workers of one CPU
each must therefore land on different nodes, which the test reads back from Ray's actor table. Shards are read
from the real SeaweedFS server, checkpoints go to S3 and the run is tracked on a real MLflow server.

At a randomly chosen checkpoint a watcher removes one worker node at once (``remove_node(allow_graceful=
False)``: its raylet, object store and every process on it, the training worker included) and adds a
replacement node.
Ray Train restarts the worker group from the last checkpoint in S3. The run must end with the weights of an
uninterrupted run (two workers both times, each rank continuing its own random stream), with every planned
checkpoint registered once, and with one MLflow run holding each step once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from node_loss_helpers import (
    EVERY,
    ITERATIONS,
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


@pytest.fixture
def cluster(s3_env: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The three-node cluster (``node_loss_helpers``), started after ``s3_env``."""
    with three_node_cluster() as started:
        yield started


def _config(data: str, runs: str, name: str, tracking: str) -> Config:
    return load_config(
        None,
        [
            *run_settings(data, runs, tracking),
            f"run.name={name}",
            "run.num_workers=2",
            "run.cpus_per_worker=1",
            "tracking.experiment=node-loss",
        ],
    )


def test_a_lost_node_resumes_from_s3_with_the_same_weights(
    cluster: tuple[Any, dict[str, Any]],
    s3_env: str,
    mlflow_server: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import run_training
    from pipeline.train.resources import connect

    ray_cluster, nodes = cluster
    source = build_source("generated", None, image_size=(48, 48), counts={"train": 16, "val": 2})
    data, _ = write_shards(source, storage.join(s3_env, "datasets"), workers=1, progress=False)
    runs = storage.join(s3_env, "runs")
    # Node-local state: a local run.storage on this cluster is warned about before anything runs.
    with caplog.at_level(logging.WARNING):
        connect(_config(data, str(tmp_path), "local", mlflow_server.uri))
    assert "is a local folder but the Ray cluster has 3 nodes" in caplog.text

    started = time.monotonic()
    run_training(_config(data, runs, "uninterrupted", mlflow_server.uri))
    reference_s = time.monotonic() - started
    reference = final_model(storage.join(runs, "uninterrupted"))
    before = set(actors(WORKER))

    seed = random.randrange(2**32)
    after = random.Random(seed).randint(1, ITERATIONS // EVERY // 2)
    log.warning("fault: node_b removed after %d checkpoints (seed %d)", after, seed)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        training = pool.submit(run_training, _config(data, runs, "lost-node", mlflow_server.uri))
        record = lose_a_node(ray_cluster, nodes, [storage.join(runs, "lost-node")], after, training)
        report = training.result(timeout=600)
    fault = {key: value for key, value in record.items() if key != "alive_at_kill"} | {"seed": seed}
    log.warning(
        "uninterrupted run %.0f s, run with a lost node %.0f s; kill record %s",
        reference_s,
        time.monotonic() - started,
        fault,
    )

    # The two workers ran on the two worker nodes; after the loss, on the surviving one and the replacement.
    ids = record["node_ids"]
    workers = {actor_id: info for actor_id, info in actors(WORKER).items() if actor_id not in before}
    at_kill = set(workers) & set(record["alive_at_kill"])
    first = {workers[actor_id]["Address"]["NodeID"] for actor_id in at_kill}
    assert first == {ids["node_a"], ids["node_b"]}, (first, ids, seed)
    later = {
        info["Address"]["NodeID"] for actor_id, info in workers.items() if actor_id not in at_kill
    }  # the worker group Ray Train restarted
    assert ids["node_c"] in later and ids["node_b"] not in later, (later, ids, seed)
    assert max(record["checkpoints_at_kill"].values()) < ITERATIONS // EVERY, fault
    assert "remove_error" not in record, fault

    # Resumed from S3 and bit-equal to the uninterrupted run.
    final = final_model(storage.join(runs, "lost-node"))
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(final[key], value), f"{key} differs from the uninterrupted run (seed {seed})"

    # Every planned checkpoint registered once and loadable; none lost, none twice, none left unregistered
    # (one the lost worker wrote but Ray never registered is removed once the run is past it).
    iterations = registered(storage.join(runs, "lost-node"))
    assert sorted(iterations) == list(range(EVERY, ITERATIONS + 1, EVERY)), (iterations, seed)
    assert len(checkpoint_folders(storage.join(runs, "lost-node"))) == len(iterations), fault

    # One MLflow run, finished, each step of the loss curve once.
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("node-loss")
    names = [run.info.run_name for run in client.search_runs([experiment.experiment_id])]
    assert sorted(names) == ["lost-node", "uninterrupted"]
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(report.run_id, "train/loss")]
    assert sorted(steps) == list(range(EVERY, ITERATIONS + 1, EVERY)), (steps, seed)
