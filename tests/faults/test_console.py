"""What a person sees: a Ray training through the CLI prints the project's own lines (forwarded from the
workers with Ray's prefix), the results table and where to look, and none of Ray's internal notices."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PREFIX = re.compile(r"^\((\w+) pid=\d+(?:, ip=[\d.]+)?\) ")  # Ray's prefix of a forwarded line
# Ray's internal chatter as it appeared on the console before: the controller's and the placement-group
# cleaner's notices, the workers' report dumps and checkpoint paths, and the core worker's C++ line about
# the preemption watcher's actor (not started on a Ray instance of one machine).
RAY_INTERNALS = (
    "PlacementGroupCleaner",
    "Failed to query Ray Train Controller",
    "Reporting training result",
    "TrainingReport(",
    "Requesting resources",
    "Attempting to start training worker group",
    "Checkpoint successfully created",
    "Started a local Ray instance",
    "Logical resource usage",
    "Setting up process group",
    "PreemptionWatcher",
    "core_worker.cc",
)


def _train(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    source = build_source("generated", None, image_size=(48, 48), counts={"train": 8, "val": 2})
    data_uri, _ = write_shards(source, str(tmp_path / "data"), workers=1, progress=False)
    settings = [
        f"data.uri={data_uri}",
        "data.crop_size=48",
        "data.batch_size=2",
        "train.iterations=4",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.eval_every=2",
        "eval.scales=[1.0]",
        f"run.storage={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "run.ray=true",
        "run.cpus_per_worker=1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        *extra,
        "train",
        *(arg for s in settings for arg in ("--set", s)),
    ]
    return subprocess.run(
        command,
        cwd=ROOT,
        env=env | {"RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_a_ray_training_prints_only_the_projects_lines(tmp_path: Path) -> None:
    result = _train(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = (result.stdout + result.stderr).splitlines()
    lines = [PREFIX.sub("", ANSI.sub("", raw)).strip() for raw in output]
    if any("Found multiple active Ray instances" in line for line in lines):
        # Another Ray instance on this machine (a test run beside this one): Ray's placement-group cleaner
        # cannot tell which is its own and its thread dies with a traceback. A real error, not chatter.
        lines = [line for line in lines if line != "Exception in thread PlacementGroupCleanerMonitor:"]
    chatter = [line for line in lines if any(marker in line for marker in RAY_INTERNALS)]
    assert chatter == [], "\n".join(chatter[:20])
    assert any(line.startswith("INFO iteration 4/4") for line in lines)  # the project's own lines
    assert "| single-scale |" in result.stdout
