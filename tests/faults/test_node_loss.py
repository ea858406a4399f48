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
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import Config, load_config
from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards
from pipeline.io import storage
from pipeline.io.checkpoints import CHECKPOINT_FILE, load

pytestmark = [pytest.mark.integration, pytest.mark.slow]
log = logging.getLogger(__name__)

ITERATIONS, EVERY = 16, 2
WORKER = "RayTrainWorker"  # Ray Train's worker actor class


@pytest.fixture
def cluster(s3_env: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Head (0 CPUs) + two worker nodes of 1 CPU; the driver connected. Started after ``s3_env``: the nodes'
    processes inherit its AWS_* settings, as a real cluster's nodes hold the credentials."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = {name: cluster.add_node(num_cpus=1, resources={name: 1}) for name in ("node_a", "node_b")}
    ray.init(address=cluster.address)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def _config(data: str, runs: str, name: str, tracking: str) -> Config:
    return load_config(None, [
        f"data.uri={data}", "data.crop_size=48", "data.batch_size=2", f"train.iterations={ITERATIONS}",
        f"train.checkpoint_every={EVERY}", "train.eval_every=8", f"train.log_every={EVERY}",
        "eval.scales=[1.0]",
        f"run.storage={runs}", f"run.name={name}", "run.num_workers=2", "run.cpus_per_worker=1",
        "run.max_failures=2", f"train.keep_checkpoints={ITERATIONS // EVERY + 2}", f"tracking.uri={tracking}",
        "tracking.experiment=node-loss",
    ])


def _workers() -> dict[str, dict[str, Any]]:
    """Ray Train's worker actors, alive or dead, by actor id (from the GCS: no dashboard needed)."""
    import ray._private.state

    return {actor_id: info for actor_id, info in ray._private.state.actors().items()
            if info["ActorClassName"] == WORKER}


def _node_ids() -> dict[str, str]:
    """Custom resource name (``node_a``, ...) -> node id, for the alive nodes."""
    import ray

    return {name: node["NodeID"] for node in ray.nodes() if node["Alive"]
            for name in node["Resources"] if name.startswith("node_")}


def _registered(run_folder: str) -> list[int]:
    """The iterations of the checkpoints Ray Train registered (its snapshot in S3), each loaded whole."""
    names = storage.list_files(run_folder)
    snapshot = json.loads(storage.read_bytes(storage.join(run_folder, "checkpoint_manager_snapshot.json")))
    iterations = []
    for result in snapshot["checkpoint_results"]:
        folder = result["checkpoint_dir_name"]
        assert f"{folder}/{CHECKPOINT_FILE}" in names, folder
        iterations.append(load(storage.join(run_folder, folder, CHECKPOINT_FILE))["iteration"])
    return iterations


def _final_model(run_folder: str) -> dict[str, torch.Tensor]:
    names = storage.list_files(run_folder)
    states = [load(storage.join(run_folder, name)) for name in names
              if name.startswith("checkpoint_") and name.endswith(CHECKPOINT_FILE)]
    final = max(states, key=lambda state: state["iteration"])
    assert final["iteration"] == ITERATIONS
    return final["model"]


def _lose_a_node(cluster: Any, nodes: dict[str, Any], run_folder: str, after: int,
                 training: concurrent.futures.Future) -> dict[str, Any]:
    """Once ``after`` checkpoints exist in S3, remove ``node_b`` (it hosts one of the two workers) at once,
    then add a replacement node ``node_c``, as an autoscaler would. Runs in the main thread (a Ray node
    installs signal handlers); the training runs in another. Returns what happened."""
    record: dict[str, Any] = {}
    deadline = time.monotonic() + 300
    written: set[str] = set()
    while time.monotonic() < deadline and not training.done():
        written = {name.split("/")[0] for name in storage.list_files(run_folder)
                   if name.startswith("checkpoint_") and name.endswith(CHECKPOINT_FILE)}
        if len(written) >= after:
            break
        time.sleep(0.1)
    record["checkpoints_at_kill"] = len(written)
    record["node_ids"] = _node_ids()
    record["alive_workers_at_kill"] = {actor_id for actor_id, info in _workers().items()
                                       if info["State"] == "ALIVE"}
    started = time.monotonic()
    try:
        cluster.remove_node(nodes["node_b"], allow_graceful=False)
    except Exception as error:  # noqa: BLE001 - reported by the test; the replacement must come regardless
        record["remove_error"] = repr(error)
    finally:
        record["removed_in_s"] = time.monotonic() - started
        # Without a replacement the run would wait for resources forever: it always joins.
        cluster.add_node(num_cpus=1, resources={"node_c": 1})
        record["node_ids"] |= _node_ids()
    return record


def test_a_lost_node_resumes_from_s3_with_the_same_weights(cluster: tuple[Any, dict[str, Any]], s3_env: str,
                                                            mlflow_server: Any, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import run_training
    from pipeline.train.ray_train import connect

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
    reference = _final_model(storage.join(runs, "uninterrupted"))
    before = set(_workers())

    seed = random.randrange(2**32)
    after = random.Random(seed).randint(1, ITERATIONS // EVERY // 2)
    log.warning("fault: node_b removed after %d checkpoints (seed %d)", after, seed)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        training = pool.submit(run_training, _config(data, runs, "lost-node", mlflow_server.uri))
        record = _lose_a_node(ray_cluster, nodes, storage.join(runs, "lost-node"), after, training)
        report = training.result(timeout=600)
    log.warning("uninterrupted run %.0f s, run with a lost node %.0f s; kill record %s", reference_s,
                time.monotonic() - started, record)

    # The two workers ran on the two worker nodes; after the loss, on the surviving one and the replacement.
    ids = record["node_ids"]
    workers = {actor_id: info for actor_id, info in _workers().items() if actor_id not in before}
    first = {workers[actor_id]["Address"]["NodeID"] for actor_id in record["alive_workers_at_kill"]}
    assert first == {ids["node_a"], ids["node_b"]}, (first, ids, seed)
    later = {info["Address"]["NodeID"] for actor_id, info in workers.items()
             if actor_id not in record["alive_workers_at_kill"]}  # the worker group Ray Train restarted
    assert ids["node_c"] in later and ids["node_b"] not in later, (later, ids, seed)
    assert record["checkpoints_at_kill"] < ITERATIONS // EVERY, (record, seed)
    assert "remove_error" not in record, record

    # Resumed from S3 and bit-equal to the uninterrupted run.
    final = _final_model(storage.join(runs, "lost-node"))
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(final[key], value), f"{key} differs from the uninterrupted run (seed {seed})"

    # Every planned checkpoint registered once and loadable; none lost, none twice.
    iterations = _registered(storage.join(runs, "lost-node"))
    assert sorted(iterations) == list(range(EVERY, ITERATIONS + 1, EVERY)), (iterations, seed)

    # One MLflow run, finished, each step of the loss curve once.
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("node-loss")
    names = [run.info.run_name for run in client.search_runs([experiment.experiment_id])]
    assert sorted(names) == ["lost-node", "uninterrupted"]
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(report.run_id, "train/loss")]
    assert sorted(steps) == list(range(EVERY, ITERATIONS + 1, EVERY)), (steps, seed)
