"""End to end on the local stack, the way a user works with a cluster: stack up -> prepare the generated
dataset into S3 -> submit a training job through the Jobs API -> it succeeds -> MLflow holds its metrics and
its checkpoint artifact in S3 -> a scheduled 2-trial ASHA search records nested runs -> jobs list / logs /
stop -> stack down, with a job still running, leaves no process behind. No secret travels with any job.

The steps share one stack and run in file order; each checks what the one before it left.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stack_helpers import alive, port_open, run_stack, running_stack, stack_env, stack_pids

from pipeline.cli.main import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/quickstart_ccnet-tiny_generated-192x192_cpu.yaml"
DATA = "s3://ccnet/datasets/generated/v1"
TINY = [  # a few iterations of the tiny model on 48x48 images, one Ray worker on half a CPU
    f"data.uri={DATA}",
    "run.storage=s3://ccnet/runs",
    "train.iterations=4",
    "train.checkpoint_every=2",
    "train.eval_every=2",
    "train.log_every=2",
    "data.crop_size=48",
    "data.batch_size=4",
    "eval.scales=[1.0]",
    "run.cpus_per_worker=0.5",
    "tracking.experiment=e2e",
]
SEARCH = [
    "tune.num_samples=2",
    "tune.grace_period=2",
    "tune.space={train.lr: {loguniform: [0.001, 0.1]}, data.crop_size: {choice: [32, 48]}}",
]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Path, dict[str, int]]]:
    with running_stack() as up:
        yield up


@pytest.fixture
def env(stack: tuple[Path, dict[str, int]], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process pointed at the stack (``source env.sh``), credentials included: the jobs must not get
    them from here."""
    root, _ = stack
    values = stack_env(root) | {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    return values


def _jobs_client() -> Any:
    from pipeline.cli.submit import client

    return client(None)


def _s3(env: dict[str, str]) -> Any:
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def _submitted_id(out: str) -> str:
    return next(line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("submitted "))


def _assert_no_secret(env: dict[str, str], job_id: str) -> None:
    """Neither the job's record (runtime env, metadata, entry point) nor its logs hold a credential."""
    jobs = _jobs_client()
    record = json.dumps(jobs.get_job_info(job_id).__dict__, default=str)
    logs = jobs.get_job_logs(job_id)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        assert env[name] not in record, f"{name} in the record of job {job_id}"
        assert env[name] not in logs, f"{name} in the logs of job {job_id}"


def test_prepare_the_dataset_into_s3(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "submit",
            "prepare_data",
            "--",
            "--dataset",
            "generated",
            "--out",
            "s3://ccnet/datasets",
            "--count",
            "train=8,val=2",
            "--image-size",
            "48",
            "--workers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{DATA}: train 8, val 2 samples" in out
    manifest = json.loads(
        _s3(env).get_object(Bucket="ccnet", Key="datasets/generated/v1/manifest.json")["Body"].read()
    )
    assert manifest["counts"] == {"train": 8, "val": 2}
    _assert_no_secret(env, _submitted_id(out))


def test_training_job_records_metrics_and_checkpoint_in_s3(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    code = main(["submit", "train", "-c", CONFIG, *_sets([*TINY, "run.name=e2e-train"])])
    out = capsys.readouterr().out
    job_id = _submitted_id(out)
    assert code == 0, out
    assert f"job {job_id} SUCCEEDED" in out and "| multi-scale+flip |" in out  # the job's output, followed
    runtime_env = _jobs_client().get_job_info(job_id).runtime_env
    assert set(runtime_env["env_vars"]) <= {
        "MLFLOW_TRACKING_URI",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "RAY_USAGE_STATS_ENABLED",
        "MLFLOW_DISABLE_TELEMETRY",
    }
    _assert_no_secret(env, job_id)

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'e2e-train'")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    _assert_a_user_can_decide_from(client, experiment, run)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/best")}
    assert artifacts == {"checkpoints/best/checkpoint.pt"}
    keys = {item["Key"] for item in _s3(env).list_objects_v2(Bucket="ccnet", Prefix="mlflow/")["Contents"]}
    assert any(key.endswith(f"{run.info.run_id}/artifacts/checkpoints/best/checkpoint.pt") for key in keys)
    ray_checkpoints = _s3(env).list_objects_v2(Bucket="ccnet", Prefix="runs/e2e-train/")["Contents"]
    assert any(item["Key"].endswith("checkpoint.pt") for item in ray_checkpoints)


def _assert_a_user_can_decide_from(client: Any, experiment: Any, run: Any) -> None:
    """What the MLflow server holds for a training submitted as a job: the model as built, the variant, a
    description with the results, where it came from, the dataset version as inputs, the final results under
    their short names, and the best model registered with its aliases and its eval metrics."""
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert (params["model.attention"], params["model.recurrence"], params["model.placement"]) == (
        "criss_cross",
        "2",
        "head",
    )
    assert not any(key.startswith(("tracking.", "tune.")) for key in params)
    assert tags["ccnet.variant"] == "criss_cross R=2 head os8"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] == "jobs.train"
    assert "mlflow.user" in tags
    assert experiment.tags["mlflow.note.content"].startswith("CCNet (criss-cross attention) trainings")
    note = tags["mlflow.note.content"]
    assert "trained 4 iterations on generated v1 train" in note and "multi-scale+flip" in note
    inputs = {
        (d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {("generated/v1/train", "training"), ("generated/v1/val", "validation")}
    assert {"final/mIoU_ss", "final/mIoU_ms_flip"} <= set(metrics)
    assert not any("single-scale" in key or "multi-scale" in key for key in metrics)
    assert f"{metrics['final/mIoU_ms_flip'] * 100:.1f} multi-scale+flip" in note

    name = "ccnet-generated"  # one registered model per task (the dataset)
    champion = client.get_model_version_by_alias(name, "champion")
    candidate = client.get_model_version_by_alias(name, "candidate")
    assert champion.version == candidate.version and champion.run_id == run.info.run_id
    logged = client.get_logged_model(champion.model_id or champion.source.removeprefix("models:/"))
    scores = {m.key: m.value for m in logged.metrics}
    assert scores["val_mIoU"] == pytest.approx(metrics["final/mIoU_ms_flip"])


def test_scheduled_search_records_nested_runs(
    env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    import pipeline.cli.schedule
    from pipeline.cli.submit import wait

    # The Kubernetes CronJob's schedule, Saturdays 02:00, on a clock that is 2 s before one.
    started, fake_start = time.monotonic(), dt.datetime(2026, 12, 5, 1, 59, 58, tzinfo=dt.UTC)
    monkeypatch.setattr(
        pipeline.cli.schedule,
        "_now",
        lambda tz: fake_start + dt.timedelta(seconds=time.monotonic() - started),
    )
    code = main(["schedule", "0 2 * * 6", "tune", "-c", CONFIG, *_sets([*TINY, *SEARCH]), "--max-runs", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    job_id = _submitted_id(out)
    jobs = _jobs_client()
    assert wait(jobs, job_id, timeout=600) == "SUCCEEDED", jobs.get_job_logs(job_id)[-3000:]
    assert "--set tune.name=scheduled-20261205-0200" in jobs.get_job_info(job_id).entrypoint
    _assert_no_secret(env, job_id)

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("e2e")
    (parent,) = client.search_runs(
        [experiment.experiment_id], "attributes.run_name = 'scheduled-20261205-0200'"
    )
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    assert all(client.get_metric_history(child.info.run_id, "val/mIoU") for child in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert artifacts == {"search/results.md", "search/best.json", "search/best_config.yaml"}


def _wait_running(job_id: str, timeout: float = 120) -> None:
    jobs, deadline = _jobs_client(), time.monotonic() + timeout
    while (status := jobs.get_job_status(job_id).value) != "RUNNING":
        assert status == "PENDING" and time.monotonic() < deadline, status
        time.sleep(0.5)


def test_jobs_list_logs_and_stop(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    long_run = [
        "submit",
        "train",
        "-c",
        CONFIG,
        *_sets([*TINY, "train.iterations=100000", "run.name=e2e-long"]),
        "--no-follow",
        "--submission-id",
        "e2e-long",
    ]
    assert main(long_run) == 0
    _wait_running("e2e-long")
    assert main(["jobs", "stop", "e2e-long"]) == 0
    assert capsys.readouterr().out.strip().endswith("job e2e-long STOPPED")
    assert main(["jobs", "list"]) == 0
    listing = capsys.readouterr().out
    assert "| e2e-long | STOPPED |" in listing
    assert listing.count("| SUCCEEDED |") == 3  # prepare, train, search
    assert main(["jobs", "logs", "e2e-long"]) == 0
    assert "Running entrypoint for job e2e-long" in capsys.readouterr().out


def test_down_with_a_job_running_leaves_nothing(
    stack: tuple[Path, dict[str, int]], env: dict[str, str]
) -> None:
    root, ports = stack
    assert (
        main(
            [
                "submit",
                "train",
                "-c",
                CONFIG,
                *_sets([*TINY, "train.iterations=100000", "run.name=e2e-left-running"]),
                "--no-follow",
                "--submission-id",
                "e2e-left-running",
            ]
        )
        == 0
    )
    _wait_running("e2e-left-running")
    pids = json.loads((root / "pids.json").read_text())
    running = stack_pids(root, pids)
    drivers = [pid for pid in running if "jobs.train" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert drivers, "the job's driver should be among the stack's processes"
    result = run_stack(root, "down")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [pid for pid in running if alive(pid)]
    assert not stack_pids(root, pids)
    assert not [name for name, port in ports.items() if port_open(port)]
