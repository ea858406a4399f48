"""What the node-loss tests share: a Ray cluster of three nodes on this machine, what Ray's actor table says
about placement, what a run left in S3, and the fault itself (a worker node removed at once, a replacement
added).

The cluster (``ray.cluster_utils.Cluster``, each node its own raylet, object store and processes): a head with
no CPU, as the head pod of ``infra/k8s`` (``num-cpus: "0"``), and two worker nodes of one CPU each, each
advertising its own resource (``node_a``, ``node_b``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.io import storage
from pipeline.io.checkpoints import CHECKPOINT_FILE, load

ITERATIONS, EVERY = 16, 2  # a run's iterations, and a checkpoint every EVERY of them
WORKER = "RayTrainWorker"  # Ray Train's worker actor class
TRIAL = "ImplicitFunc"  # Ray Tune's actor for a function trainable: a search's trial driver


def run_settings(data: str, runs: str, tracking: str) -> list[str]:
    """The training both tests lose a node in: tiny, a checkpoint every EVERY iterations (all kept), two
    restarts allowed, data and checkpoints in S3, tracked at ``tracking``."""
    return [
        f"data.uri={data}",
        "data.crop_size=48",
        "data.batch_size=2",
        f"train.iterations={ITERATIONS}",
        f"train.checkpoint_every={EVERY}",
        "train.eval_every=8",
        f"train.log_every={EVERY}",
        f"train.keep_checkpoints={ITERATIONS // EVERY + 2}",
        "eval.scales=[1.0]",
        f"run.storage={runs}",
        "run.max_failures=2",
        f"tracking.uri={tracking}",
    ]


@contextlib.contextmanager
def three_node_cluster() -> Iterator[tuple[Any, dict[str, Any]]]:
    """Head (0 CPUs) + two worker nodes of 1 CPU, ``node_a`` and ``node_b``; the driver connected. Start it
    after ``s3_env``: the nodes' processes inherit its AWS_* settings, as a real cluster's nodes hold the
    credentials. Yields the cluster and its worker nodes by name."""
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


def actors(class_name: str | None = None) -> dict[str, dict[str, Any]]:
    """Ray's actors (of ``class_name``, or all), alive or dead, by actor id (from the GCS: no dashboard
    needed). Each gives its ``ActorClassName`` (without the scope of a class made inside a function: a
    trainable wrapped by ``tune.with_parameters`` is ``wrap_function.<locals>.ImplicitFunc``), ``State``,
    ``Address`` (``NodeID``, ``Port``) and ``OwnerAddress`` (the ``Port`` of the process that created it)."""
    import ray._private.state

    found = {
        actor_id: {**info, "ActorClassName": info["ActorClassName"].rsplit(".", 1)[-1]}
        for actor_id, info in ray._private.state.actors().items()
    }
    return {
        actor_id: info
        for actor_id, info in found.items()
        if class_name is None or info["ActorClassName"] == class_name
    }


def node_ids() -> dict[str, str]:
    """Custom resource name (``node_a``, ...) -> node id, for the alive nodes."""
    import ray

    return {
        name: node["NodeID"]
        for node in ray.nodes()
        if node["Alive"]
        for name in node["Resources"]
        if name.startswith("node_")
    }


def checkpoint_folders(run_folder: str) -> set[str]:
    """The run's checkpoint folders that hold a checkpoint file in S3, registered by Ray or not."""
    return {
        name.split("/")[0]
        for name in storage.list_files(run_folder)
        if name.startswith("checkpoint_") and name.endswith(CHECKPOINT_FILE)
    }


def registered(run_folder: str) -> list[int]:
    """The iterations of the checkpoints Ray Train registered (its snapshot in S3), each loaded whole."""
    names = storage.list_files(run_folder)
    snapshot = json.loads(storage.read_bytes(storage.join(run_folder, "checkpoint_manager_snapshot.json")))
    iterations = []
    for result in snapshot["checkpoint_results"]:
        folder = result["checkpoint_dir_name"]
        assert f"{folder}/{CHECKPOINT_FILE}" in names, folder
        iterations.append(load(storage.join(run_folder, folder, CHECKPOINT_FILE))["iteration"])
    return iterations


def final_model(run_folder: str) -> dict[str, torch.Tensor]:
    """The weights of the run's last checkpoint, which must be its last iteration's."""
    names = storage.list_files(run_folder)
    states = [
        load(storage.join(run_folder, name))
        for name in names
        if name.startswith("checkpoint_") and name.endswith(CHECKPOINT_FILE)
    ]
    final = max(states, key=lambda state: state["iteration"])
    assert final["iteration"] == ITERATIONS
    return final["model"]


def lose_a_node(
    cluster: Any,
    nodes: dict[str, Any],
    run_folders: list[str],
    after: int,
    running: concurrent.futures.Future,
) -> dict[str, Any]:
    """Once each run of ``run_folders`` has ``after`` checkpoints in S3, remove ``node_b`` at once (its
    raylet, object store and every process on it), then add a replacement node ``node_c``, as an autoscaler
    would. Runs in the main thread (a Ray node installs signal handlers); the job runs in ``running``.

    Returns:
        What happened: ``checkpoints_at_kill`` (per run folder), ``node_ids`` (every worker node's, the
        removed one included), ``alive_at_kill`` (the actors alive just before, by id, as :func:`actors`
        gives them), ``removed_in_s`` and, if removing failed, ``remove_error``.
    """
    record: dict[str, Any] = {}
    deadline = time.monotonic() + 300
    counts: dict[str, int] = {}
    while time.monotonic() < deadline and not running.done():
        counts = {folder: len(checkpoint_folders(folder)) for folder in run_folders}
        if min(counts.values()) >= after:
            break
        time.sleep(0.1)
    record["checkpoints_at_kill"] = counts
    record["node_ids"] = node_ids()
    record["alive_at_kill"] = {
        actor_id: info for actor_id, info in actors().items() if info["State"] == "ALIVE"
    }
    started = time.monotonic()
    try:
        cluster.remove_node(nodes["node_b"], allow_graceful=False)
    except Exception as error:  # noqa: BLE001 - reported by the test; the replacement must come regardless
        record["remove_error"] = repr(error)
    finally:
        record["removed_in_s"] = time.monotonic() - started
        # Without a replacement the job would wait for resources forever: it always joins.
        cluster.add_node(num_cpus=1, resources={"node_c": 1})
        record["node_ids"] |= node_ids()
    return record
