"""A load test of the local stack: three trainings, a search and a duplicate training submitted at once to one
Ray head, one SeaweedFS and one MLflow server, with an S3 outage and an MLflow restart in the middle.

Every job finishes, or is refused clearly (the duplicate: one ERROR line naming the run's owner); every MLflow
run ends in a terminal state; no metric step is lost or logged twice; every checkpoint a run kept loads whole
and the last one is the last iteration's. The counts are printed (``pytest -s``) for the closing note.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from stack_helpers import running_stack, stack_env

from infra.local.stack import Stack
from pipeline.cli.main import main
from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards
from pipeline.io import storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/quickstart_ccnet-tiny_generated-192x192_cpu.yaml"
DATA = "s3://ccnet/datasets/generated/v1"
ITERATIONS = 16
TINY = [
    f"data.uri={DATA}",
    "run.storage=s3://ccnet/runs",
    f"train.iterations={ITERATIONS}",
    "train.checkpoint_every=4",
    "train.eval_every=8",
    "train.log_every=2",
    "data.crop_size=48",
    "data.batch_size=4",
    "eval.scales=[1.0]",
    "run.cpus_per_worker=0.25",
    "run.max_failures=3",
    "tracking.experiment=load",
    "train.keep_checkpoints=2",
]
TRAININGS = ("load-a", "load-b", "load-c")
SEARCH = [
    "tune.name=load-search",
    "tune.num_samples=2",
    "tune.scheduler=none",
    "tune.max_concurrent=2",
    "tune.space={train.lr: {loguniform: [0.001, 0.1]}}",
    "train.iterations=8",
]
OUTAGE_SECONDS = 10.0  # how long each server stays down (the fault injected, not a bound on anything)


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Stack, dict[str, str]]]:
    with running_stack() as (root, _):
        values = stack_env(root) | {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
        monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(ROOT)
        yield Stack(root), values


def _submit(args: list[str], submission_id: str) -> None:
    assert main(["submit", *args, "--no-follow", "--submission-id", submission_id]) == 0


def _wait_until(predicate: Any, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _outage(stack: Stack, service: str) -> None:
    """``service`` stopped, kept down OUTAGE_SECONDS, started again and healthy."""
    stack.stop(service, grace=5.0)
    time.sleep(OUTAGE_SECONDS)
    stack.start(service)
    stack.wait_healthy(service, timeout=120)


def _logged(client: Any, run_name: str) -> bool:
    experiment = client.get_experiment_by_name("load")
    if experiment is None:
        return False
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "train/loss"))


def test_jobs_at_once_through_an_s3_outage_and_an_mlflow_restart(env: tuple[Stack, dict[str, str]]) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.cli.submit import client as jobs_client
    from pipeline.cli.submit import wait

    stack, values = env
    source = build_source("generated", None, image_size=(48, 48), counts={"train": 16, "val": 2})
    write_shards(source, "s3://ccnet/datasets", workers=1, progress=False)
    for name in TRAININGS:
        _submit(["train", "-c", CONFIG, *_sets([*TINY, f"run.name={name}"])], name)
    _submit(["tune", "-c", CONFIG, *_sets([*TINY, *SEARCH])], "load-search")
    _wait_until(lambda: storage.exists(f"s3://ccnet/runs/{TRAININGS[0]}/run.lease"), "load-a's lease")
    _submit(["train", "-c", CONFIG, *_sets([*TINY, f"run.name={TRAININGS[0]}"])], "load-a-again")

    mlflow = MlflowClient(values["MLFLOW_TRACKING_URI"])
    _wait_until(lambda: _logged(mlflow, TRAININGS[0]), "load-a's first metric")
    _outage(stack, "seaweedfs")
    _outage(stack, "mlflow")

    jobs = jobs_client(None)
    statuses = {job: wait(jobs, job, timeout=1800) for job in [*TRAININGS, "load-search", "load-a-again"]}
    logs = {job: jobs.get_job_logs(job) for job in statuses}
    assert statuses.pop("load-a-again") == "FAILED"
    errors = [line for line in logs["load-a-again"].splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "run 'load-a' is being written by" in errors[0], errors
    assert set(statuses.values()) == {"SUCCEEDED"}, {job: logs[job][-2000:] for job in statuses}

    experiment = mlflow.get_experiment_by_name("load")
    runs = mlflow.search_runs([experiment.experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    points, checkpoints = 0, 0
    for run in runs:
        if run.data.tags.get("ccnet.search") == "true":
            continue
        iterations = ITERATIONS if run.info.run_name in TRAININGS else 8
        steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(2, iterations + 1, 2)), (run.info.run_name, steps)  # none lost or twice
        points += len(steps)
        folder = f"s3://ccnet/runs/{run.info.run_name}"
        kept = [
            name
            for name in storage.list_files(folder)  # Ray's checkpoints; best/ is a copy of one
            if name.startswith("checkpoint_") and name.endswith("/checkpoint.pt")
        ]
        loaded = [
            torch.load(io.BytesIO(storage.read_bytes(f"{folder}/{name}")), weights_only=True)["iteration"]
            for name in kept
        ]
        assert iterations in loaded and len(set(loaded)) == len(loaded), (run.info.run_name, kept, loaded)
        checkpoints += len(kept)
    trials = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(trials) == 2 and len(runs) == len(TRAININGS) + 1 + 2
    print(
        f"\nload test: {len(statuses) + 1} jobs ({len(statuses)} SUCCEEDED, 1 refused), {len(runs)} "
        f"MLflow runs all FINISHED ({len(trials)} trials), {points} train/loss points each logged once, "
        f"{checkpoints} checkpoints kept and loaded, S3 and MLflow each down {OUTAGE_SECONDS:.0f} s "
        "mid-run"
    )
