"""A Ray Train worker SIGKILLed at a random point of training: the job restarts from its last checkpoint under
``FailureConfig``, finishes the planned iterations, and its final weights equal those of an uninterrupted run
with the same seed. No checkpoint is lost or half-written: every checkpoint Ray registered loads, and they
cover every planned checkpoint iteration.

The kill comes from outside, as on a cluster (OOM killer, preempted node): a watcher thread waits until the
run has written a randomly chosen number of checkpoints, waits a random fraction of a second more (so it may
land mid-step, mid-evaluation or mid-upload), and SIGKILLs the worker process.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.io.checkpoints import CHECKPOINT_FILE, load

pytestmark = [pytest.mark.integration, pytest.mark.slow]
log = logging.getLogger(__name__)

ITERATIONS, EVERY = 16, 2


def _parent(pid: int) -> int:
    """The parent pid from /proc/<pid>/stat (0 when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces


def _descends_from_this_test(pid: int) -> bool:
    """Whether ``pid`` runs under this test process: its local Ray cluster's raylet is our child, and the
    workers are the raylet's. Other Ray clusters on the machine (a user's training) are left alone."""
    while pid > 1:
        pid = _parent(pid)
        if pid == os.getpid():
            return True
    return False


def _worker_pids() -> list[int]:
    """Live Ray Train worker processes of this test's cluster (Ray names them in their process title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith("ray::RayTrainWorker") and _descends_from_this_test(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*"))


def _killer(run_dir: Path, after: int, delay: float, record: dict[str, list[int]]) -> None:
    """SIGKILL the worker once ``after`` checkpoints exist and ``delay`` s more have passed; then wait for
    the worker that replaces it. ``record``: killed pids, the checkpoints written by then, the new pids."""
    deadline = time.monotonic() + 300
    while len(_checkpoint_dirs(run_dir)) < after and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    record["checkpoints_at_kill"] = [len(_checkpoint_dirs(run_dir))]
    for pid in _worker_pids():
        os.kill(pid, signal.SIGKILL)
        record["killed"].append(pid)
    while time.monotonic() < deadline and not record["replacement"]:
        record["replacement"] = [pid for pid in _worker_pids() if pid not in record["killed"]]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def dataset(generated_dataset: Callable[..., str]) -> str:
    return generated_dataset(size=48, train=16, val=2)


def _fit(dataset: str, storage: Path, name: str) -> tuple[object, dict[str, torch.Tensor]]:
    from pipeline.train.ray_train import fit
    from pipeline.train.spec import RunSpec

    config = load_config(
        None,
        [
            f"data.uri={dataset}",
            "data.crop_size=48",
            "data.batch_size=2",
            f"train.iterations={ITERATIONS}",
            f"train.checkpoint_every={EVERY}",
            "train.eval_every=8",
            "train.log_every=4",
            "eval.scales=[1.0]",
            f"run.storage={storage}",
            f"run.name={name}",
            "run.num_workers=1",
            "run.cpus_per_worker=1",
            "run.max_failures=2",
            f"train.keep_checkpoints={ITERATIONS // EVERY + 2}",
        ],
    )
    result = fit(RunSpec.of(config.with_absolute_paths()), None)
    with result.checkpoint.as_directory() as folder:
        final = load(str(Path(folder) / CHECKPOINT_FILE))
    return result, final


def test_killed_worker_resumes_and_ends_with_the_same_weights(dataset: str, tmp_path: Path) -> None:
    import ray

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    after, delay = rng.randint(1, ITERATIONS // EVERY // 2), rng.uniform(0.0, 0.5)
    log.warning("fault: SIGKILL after %d checkpoints + %.2f s (seed %d)", after, delay, seed)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        _, reference = _fit(dataset, tmp_path, "uninterrupted")
        record: dict[str, list[int]] = {"killed": [], "replacement": []}
        killer = threading.Thread(target=_killer, args=(tmp_path / "killed", after, delay, record))
        killer.start()
        result, final = _fit(dataset, tmp_path, "killed")
        killer.join()
    finally:
        ray.shutdown()

    # The kill landed while training ran, and Ray started a new worker in its place.
    assert record["killed"] and record["checkpoints_at_kill"][0] < ITERATIONS // EVERY, (record, seed)
    assert record["replacement"], f"no worker replaced the killed one (seed {seed})"
    assert final["iteration"] == ITERATIONS
    assert final["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        assert torch.equal(final["model"][key], value), f"{key} differs from the reference (seed {seed})"
    # Every checkpoint Ray registered loads whole, and together they cover every planned iteration.
    registered = [checkpoint for checkpoint, _ in result.best_checkpoints]
    iterations = []
    for checkpoint in registered:
        with checkpoint.as_directory() as folder:
            iterations.append(load(str(Path(folder) / CHECKPOINT_FILE))["iteration"])
    assert set(iterations) == set(range(EVERY, ITERATIONS + 1, EVERY)), (iterations, seed)
