"""Two trainings with the same run.name, as two real processes, on a local folder and on a real S3 server
(SeaweedFS): the second stops with one line naming the run and the owner and writes nothing; after the
owner is killed, the same command takes the lease over and resumes the run (one MLflow run, FINISHED). Two
preparations of one dataset version from different inputs: the second stops, the version is the first's."""

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
    overrides = [
        f"data.uri={data_uri}",
        "data.batch_size=2",
        "data.crop_size=48",
        f"run.storage={run_storage}",
        f"train.iterations={iterations}",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_every=1000000",
        "run.ray=false",
        f"tracking.uri={tracking}",
        f"run.name={RUN}",
        "eval.scales=[1.0]",
    ]
    command = [sys.executable, "-m", "pipeline.cli", "train", *(a for o in overrides for a in ("--set", o))]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


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


def test_a_second_writer_is_refused_and_the_run_resumes_after_the_owner_died(
    run_storage: str, tmp_path: Path
) -> None:
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
        assert (
            f"run '{RUN}' is being written by ccnet train (pid {owner.pid} on {socket.gethostname()}"
            in errors[0]
        )
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


def _prepare(out: str, *options: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "data",
        "prepare",
        "--dataset",
        "generated",
        "--out",
        out,
        "--workers",
        "1",
        *options,
    ]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# Two preparations into the same --out and version, from different inputs under the same file names.
PREPARATIONS = {
    "other seed": (["--seed", "1"], ["--seed", "2"]),
    "other image size": (["--image-size", "48"], ["--image-size", "64"]),
    "other counts": (["--count", "train=300,val=8"], ["--count", "train=8,val=300"]),
}


@pytest.mark.parametrize("case", PREPARATIONS, ids=list(PREPARATIONS))
def test_two_preparations_of_one_version_never_mix(case: str, run_storage: str, tmp_path: Path) -> None:
    """The second, started while the first holds the version's lease, stops with one line naming it; the
    published version is the first one's, shard for shard (each equal to a preparation made alone)."""
    first, second = PREPARATIONS[case]
    sizes = ["--count", "train=300,val=8", "--image-size", "48"]
    out = storage.join(run_storage, "datasets")
    owner = _prepare(out, *sizes, *first)
    lease = storage.join(out, "generated", "v1", LEASE_FILE)
    _wait_for(lambda: storage.exists(lease), owner)
    intruder = _prepare(out, *sizes, *second)
    _, intruder_err = intruder.communicate(timeout=300)
    _, owner_err = owner.communicate(timeout=300)
    assert owner.returncode == 0, owner_err[-2000:]
    assert intruder.returncode == 2, intruder_err[-2000:]
    last = intruder_err.strip().splitlines()[-1]
    assert last.startswith("ERROR") and "dataset version generated/v1" in last, intruder_err[-2000:]
    assert "being written by" in last or "already published with other content" in last, last

    alone = write_shards(
        build_source("generated", None, **_options(*sizes, *first)),
        str(tmp_path / "alone"),
        workers=1,
        progress=False,
    )[1]
    published = json.loads(storage.read_bytes(storage.join(out, "generated", "v1", "manifest.json")))
    assert [shard["sha256"] for shard in published["shards"]] == [shard.sha256 for shard in alone.shards]
    assert LEASE_FILE not in storage.list_files(storage.join(out, "generated", "v1"))


def _options(*args: str) -> dict[str, Any]:
    """The generated source's options for the command-line flags of ``_prepare``."""
    flags = dict(zip(args[::2], args[1::2], strict=True))
    counts = dict(part.split("=") for part in flags["--count"].split(","))
    size = int(flags["--image-size"])
    return {
        "seed": int(flags.get("--seed", 0)),
        "image_size": (size, size),
        "counts": {split: int(count) for split, count in counts.items()},
    }
