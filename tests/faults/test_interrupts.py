"""Ctrl-C during a training: one line, exit 130, the MLflow run KILLED (never left RUNNING)."""

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


def test_ctrl_c_during_training_marks_the_run_killed(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    source = build_source("generated", None, image_size=(48, 48), counts={"train": 8, "val": 2})
    data_uri, _ = write_shards(source, str(tmp_path / "data"), workers=1, progress=False)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", "--set", f"data.uri={data_uri}",
         "--set", "data.batch_size=2", "--set", "data.crop_size=48", "--set", "train.iterations=100000",
         "--set", "train.log_every=1", "--set", "run.ray=false", "--set", f"run.storage={tmp_path / 'runs'}",
         "--set", f"tracking.uri={tracking}", "--set", "run.name=interrupted"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    deadline = time.monotonic() + 300  # a condition, not a fixed sleep: the first logged iteration
    for line in process.stderr:
        lines.append(line)
        if "iteration 2/" in line or time.monotonic() > deadline:
            break
    assert any("iteration 2/" in line for line in lines), "".join(lines)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130, rest
    errors = [line for line in rest.splitlines() if line.startswith("ERROR")]
    assert errors == ["ERROR interrupted (Ctrl-C): train stopped; the same command resumes it"], rest
    assert "Traceback" not in rest

    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("ccnet").experiment_id])
    assert run.info.run_name == "interrupted" and run.info.status == "KILLED"


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
    process = subprocess.Popen([sys.executable, "-c", HANGING_SHUTDOWN], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
