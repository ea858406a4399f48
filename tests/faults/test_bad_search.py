"""A search or ablation that cannot work is refused before Ray or MLflow start: one ERROR line naming the
``tune.space`` or ``tune.variants`` key, a non-zero exit, no MLflow store and no search folder written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("{data.crop_size: {choice: []}}", "tune.space.data.crop_size: choice needs at least one value"),
        ("{train.lr: {loguniform: [0, 0.1]}}", "tune.space.train.lr: loguniform needs [low, high] with 0 <"),
        ("{train.lr: {loguniform: [0.1]}}", "tune.space.train.lr: loguniform needs [low, high]"),
        ("{train.lr: {uniform: [0.1, 0.01]}}", "tune.space.train.lr: uniform needs [low, high] with low <"),
        ("{train.lr: {uniform: [0.01, .inf]}}", "tune.space.train.lr: uniform needs [low, high]"),
        ("{train.lr: {normal: [0, 1]}}", "tune.space.train.lr: expected one of ['loguniform', 'uniform'"),
        ("{model.nope: {choice: [1]}}", "tune.space.model.nope: not a key a search can vary"),
        ("{lr: {choice: [1]}}", "tune.space.lr: not a key a search can vary"),
        ("{run.name: {choice: [a, b]}}", "tune.space.run.name: not a key a search can vary"),
        ("{data.crop_size: {uniform: [160, 192]}}", "tune.space.data.crop_size: the value 160 is refused"),
        ("{train.lr: {choice: [0.01, -1]}}", "tune.space.train.lr: the value -1 is refused"),
        ("{train.amp: {choice: [O1, O3]}}", "tune.space.train.amp: the value 'O3' is refused"),
    ],
)
def test_a_bad_space_is_refused_naming_the_key(space: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"tune.space={space}"])


def test_the_default_space_and_the_ablation_configs_are_valid() -> None:
    load_config(None)
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("tune.space={data.crop_size: {choice: []}}", "tune.space.data.crop_size"),
        ("tune.space={train.lr: {loguniform: [0, 0.1]}}", "tune.space.train.lr"),
        ("tune.space={model.nope: {uniform: [0, 1]}}", "tune.space.model.nope"),
        ("tune.variants={fcn: [model.recurence=0]}", "tune.variants.fcn"),
    ],
)
def test_the_cli_refuses_a_bad_search_before_anything_starts(
    tmp_path: Path, override: str, named: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    database = tmp_path / "mlflow.db"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "tune",
            "--set",
            override,
            "--set",
            f"tracking.uri=sqlite:///{database}",
            "--set",
            f"run.storage={tmp_path / 'runs'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and named in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not database.exists() and not (tmp_path / "runs").exists()  # no MLflow run, no search folder


@pytest.mark.slow
@pytest.mark.integration
def test_workers_that_do_not_fit_the_cluster_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    env |= {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    database = tmp_path / "mlflow.db"
    source = build_source("generated", None, image_size=(32, 32), counts={"train": 2, "val": 1})
    data_uri, _ = write_shards(source, str(tmp_path / "data"), workers=1, progress=False)
    # a cluster of 2 CPUs whatever this machine has
    code = (
        "import ray, sys; ray.init(num_cpus=2, include_dashboard=False); "
        "from pipeline.cli.main import main; sys.exit(main())"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "train",
            "--set",
            "run.num_workers=8",
            "--set",
            "run.cpus_per_worker=1",
            "--set",
            f"tracking.uri=sqlite:///{database}",
            "--set",
            f"run.storage={tmp_path / 'runs'}",
            "--set",
            f"data.uri={data_uri}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [
        "ERROR run.num_workers=8 x run.cpus_per_worker=1 needs 8 CPUs, but the Ray cluster has 2 CPUs on 1 "
        "node(s), room for 2 such worker(s); lower them, or set run.resource_wait=SECONDS to wait for an "
        "autoscaler"
    ], result.stderr[-2000:]
    assert not database.exists() and not (tmp_path / "runs").exists()
