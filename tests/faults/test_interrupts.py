"""Ctrl-C or SIGTERM during a training or a search: one line, exit 130 (143 for SIGTERM), the MLflow runs
KILLED (never left RUNNING, never FINISHED), no result printed as if the search had ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).parents[2]


def _interrupted(command: str, signum: int, tmp_path: Path, settings: list[str]) -> tuple[str, str, str]:
    """Runs ``ccnet COMMAND`` on a tiny generated dataset until a training logs its second iteration, sends
    ``signum``, checks the exit status and the one ERROR line; returns stdout, stderr and the tracking URI."""
    source = build_source("generated", None, image_size=(48, 48), counts={"train": 8, "val": 2})
    data_uri, _ = write_shards(source, str(tmp_path / "data"), workers=1, progress=False)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    settings = [
        f"data.uri={data_uri}",
        "data.batch_size=2",
        "data.crop_size=48",
        "train.iterations=100000",
        "train.log_every=1",
        f"run.storage={tmp_path / 'runs'}",
        f"tracking.uri={tracking}",
        *settings,
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", command, *(a for s in settings for a in ("--set", s))],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 300  # a condition, not a fixed sleep: the second logged iteration
    for line in process.stdout:
        lines.append(line)
        if "iteration 2/" in line or time.monotonic() > deadline:
            break
    assert any("iteration 2/" in line for line in lines), "".join(lines)
    process.send_signal(signum)
    rest, _ = process.communicate(timeout=240)
    name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}[signum]
    assert process.returncode == 128 + signum, rest
    errors = [line for line in rest.splitlines() if line.startswith("ERROR")]
    assert errors == [f"ERROR interrupted ({name}): {command} stopped; the same command resumes it"], rest
    assert "Traceback" not in rest
    return "".join(lines) + rest, name, tracking


TRAINING_CASES = [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True)]


@pytest.mark.parametrize(("signum", "ray"), TRAINING_CASES, ids=["ctrl-c", "sigterm", "sigterm-ray"])
def test_an_interrupted_training_is_marked_killed(signum: int, ray: bool, tmp_path: Path) -> None:
    """With Ray too: ray.init installs Ray's own SIGTERM handler, which aborts the process."""
    from mlflow.tracking import MlflowClient

    settings = [f"run.ray={str(ray).lower()}", "run.name=interrupted", "run.cpus_per_worker=0.5"]
    _, _, tracking = _interrupted("train", signum, tmp_path, settings)
    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("ccnet").experiment_id])
    assert run.info.run_name == "interrupted" and run.info.status == "KILLED"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_search_is_killed_not_finished(signum: int, tmp_path: Path) -> None:
    """Tune's own Ctrl-C handling returns the partial search as if it had ended: here the parent run and
    every trial's run end KILLED, nothing prints a best result, and the exit status says what happened."""
    from mlflow.tracking import MlflowClient

    output, _, tracking = _interrupted(
        "tune",
        signum,
        tmp_path,
        [
            "tune.name=interrupted",
            "tune.num_samples=3",
            "tune.max_concurrent=1",
            "tune.scheduler=none",
            "tune.space={train.lr: {loguniform: [0.001, 0.1]}}",
            "run.cpus_per_worker=0.5",
        ],
    )
    assert "best:" not in output and "search stopped:" in output
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("ccnet").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert children and len(children) + 1 == len(runs)
    assert {run.info.status for run in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]


HANGING_SHUTDOWN = """
import logging, pathlib, sys, time
from pipeline import interrupts
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
interrupts.install()
interrupts.on_forced_exit(lambda: pathlib.Path("marked").write_text("KILLED"))
ready = False
while True:  # a library whose graceful shutdown never ends: it swallows the interrupt and waits on
    try:
        if not ready:
            print("ready", flush=True)
            ready = True
        time.sleep(0.05)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


@pytest.mark.parametrize("second_ctrl_c", [False, True])
def test_ctrl_c_ends_a_hanging_shutdown_within_the_grace_time(second_ctrl_c: bool, tmp_path: Path) -> None:
    env = os.environ | {"CCNET_INTERRUPT_GRACE_SECONDS": "3", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", HANGING_SHUTDOWN],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    line = process.stdout.readline().strip()
    assert line == "interrupted", process.communicate()[1]  # the first Ctrl-C reached the command
    if second_ctrl_c:
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)  # not forever: the watchdog ends it
    assert process.returncode == 130
    expected = "interrupted again (Ctrl-C)" if second_ctrl_c else "still stopping 3 s after Ctrl-C"
    assert stderr.strip().splitlines() == [f"ERROR {expected}; exiting now"]
    assert (tmp_path / "marked").read_text() == "KILLED"  # e.g. the MLflow run, never left RUNNING
