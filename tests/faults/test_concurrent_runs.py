"""Two trainings with the same run.name, as two real processes, on a local folder and on a real S3 server
(SeaweedFS): the second stops with one line naming the run and the owner and writes nothing; after the
owner is killed, the same command takes the lease over and resumes the run (one MLflow run, FINISHED)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards
from pipeline.io import storage
from pipeline.io.checkpoints import CheckpointStore
from pipeline.io.lease import LEASE_FILE

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).parents[2]
RUN = "shared-name"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def run_storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs")
    s3_env = request.getfixturevalue("s3_env")
    storage.ensure_bucket(s3_env)
    return storage.join(s3_env, "runs")


def _train(data_uri: str, run_storage: str, tracking: str, iterations: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    overrides = [f"data.uri={data_uri}", "data.batch_size=2", "data.crop_size=48",
                 f"run.storage={run_storage}", f"train.iterations={iterations}", "train.log_every=1",
                 "train.checkpoint_every=2", "train.eval_every=1000000", "run.ray=false",
                 f"tracking.uri={tracking}", f"run.name={RUN}", "eval.scales=[1.0]"]
    command = [sys.executable, "-m", "pipeline.cli", "train", *(a for o in overrides for a in ("--set", o))]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(predicate: Any, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out waiting for the first run to get going"
        time.sleep(0.1)


def _runs(tracking: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("ccnet")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_a_second_writer_is_refused_and_the_run_resumes_after_the_owner_died(run_storage: str,
                                                                              tmp_path: Path) -> None:
    source = build_source("generated", None, image_size=(48, 48), counts={"train": 8, "val": 2})
    data_uri, _ = write_shards(source, str(tmp_path / "data"), workers=1, progress=False)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prefix = storage.join(run_storage, RUN)
    store = CheckpointStore(prefix)

    owner = _train(data_uri, run_storage, tracking, iterations=1_000_000)
    try:
        _wait_for(lambda: bool(store.iterations()), owner)  # it holds the lease and wrote a checkpoint
        lease = json.loads(storage.read_bytes(storage.join(prefix, LEASE_FILE)))
        assert lease["pid"] == owner.pid

        second = _train(data_uri, run_storage, tracking, iterations=10)
        _, stderr = second.communicate(timeout=300)
        assert second.returncode == 2, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("ERROR")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr
        assert f"run '{RUN}' is being written by ccnet train (pid {owner.pid} on {socket.gethostname()}" \
            in errors[0]
        assert [run.info.run_name for run in _runs(tracking)] == [RUN]  # the second opened no MLflow run
        assert json.loads(storage.read_bytes(storage.join(prefix, LEASE_FILE)))["id"] == lease["id"]
    finally:
        owner.send_signal(signal.SIGKILL)  # dies holding the lease: nothing releases it
        owner.communicate(timeout=60)

    reached = store.iterations()[-1]
    resumed = _train(data_uri, run_storage, tracking, iterations=reached + 2)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "taking over the lease" in stderr and f"resumed from iteration {reached}" in stderr, stderr[-3000:]
    (run,) = _runs(tracking)  # the killed run, continued and finished: one MLflow run
    assert run.info.run_name == RUN and run.info.status == "FINISHED"
    assert not storage.exists(storage.join(prefix, LEASE_FILE))  # released at the end
