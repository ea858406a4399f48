"""The MLflow server unreachable at start (one clear line before any training work, unless tracking is
optional) and during a run (training goes on; the metrics of the outage reach the server once it is back)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infra.local.servers import free_ports
from pipeline.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(generated_dataset: Callable[..., str]) -> str:
    return generated_dataset(size=32, train=8, val=2)


def _settings(dataset: str, storage: Path, tracking: str, iterations: int) -> list[str]:
    return [
        f"data.uri={dataset}",
        "data.crop_size=32",
        "data.batch_size=2",
        f"train.iterations={iterations}",
        "train.log_every=4",
        f"train.checkpoint_every={iterations}",
        f"train.eval_every={iterations}",
        "eval.scales=[1.0]",
        "eval.flip=false",
        f"run.storage={storage}",
        "run.name=outage",
        "run.ray=false",
        f"tracking.uri={tracking}",
        "tracking.experiment=outage",
    ]


def _train(args: list[str], home: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline.cli", "train", *(a for item in args for a in ("--set", item))]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env
    )


def test_unreachable_at_start_is_one_line_before_any_training(dataset: str, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    result = _train(_settings(dataset, tmp_path / "runs", dead, 4), tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"ERROR MLflow tracking at {dead} is unusable")
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_optional_tracking_trains_without_it(dataset: str, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    result = _train([*_settings(dataset, tmp_path / "runs", dead, 4), "tracking.required=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "going on without tracking" in result.stderr
    assert (tmp_path / "runs" / "outage" / "best" / "checkpoint.pt").exists()


def test_outage_during_a_run_loses_no_metric(
    dataset: str, tmp_path: Path, mlflow_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import run_training

    iterations = 160
    client = MlflowClient(mlflow_server.uri)
    seen: dict[str, Any] = {}

    def outage() -> None:
        """Once the run has logged step 8, stop the server for a while, then start it again."""
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                runs = client.search_runs(
                    [e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'outage'"
                )
                if runs and any(
                    m.step >= 8 for m in client.get_metric_history(runs[0].info.run_id, "train/loss")
                ):
                    break
                time.sleep(0.1)
            mlflow_server.stop()
            time.sleep(3.0)
        except BaseException as error:  # reported below
            seen["error"] = error
        finally:
            mlflow_server.start()
            seen["back"] = time.monotonic()

    thread = threading.Thread(target=outage)
    thread.start()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
            report = run_training(
                load_config(None, _settings(dataset, tmp_path / "runs", mlflow_server.uri, iterations))
            )
    finally:
        thread.join()
    assert "error" not in seen
    assert any("is unreachable" in record.getMessage() for record in caplog.records), "no outage was seen"
    steps = [metric.step for metric in client.get_metric_history(report.run_id, "train/loss")]
    assert sorted(steps) == list(range(4, iterations + 1, 4))  # every logged step, the outage's included
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED" and "final/mIoU_ms_flip" in run.data.metrics
