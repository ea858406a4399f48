"""Secrets never reach what a run leaves behind: a training run with S3 keys in its environment and a password
in its tracking URI, then a scan of its MLflow params, tags, metric names and every artifact (the checkpoints
included), its checkpoints in S3, and its console output, for every secret."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards
from pipeline.io import storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "hunter2-tracking-password"


def _scan(name: str, data: bytes, secrets: list[str]) -> list[str]:
    return [f"{name} holds secret {secrets.index(secret)}" for secret in secrets if secret.encode() in data]


def test_no_secret_in_params_artifacts_checkpoints_or_logs(
    s3_env: str, seaweedfs: Any, mlflow_server: Any, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    source = build_source("generated", None, image_size=(32, 32), counts={"train": 4, "val": 2})
    data, _ = write_shards(source, storage.join(s3_env, "datasets"), workers=1, progress=False)
    runs = storage.join(s3_env, "runs")
    # Credentials from the environment only (a config holding them is refused, below); the server ignores
    # the basic-auth password, so the run goes through with it.
    tracking = mlflow_server.uri.replace("http://", f"http://ccnet:{PASSWORD}@")
    settings = [
        f"data.uri={data}",
        "data.crop_size=32",
        "data.batch_size=2",
        "train.iterations=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_every=2",
        "eval.scales=[1.0]",
        f"run.storage={runs}",
        "run.name=secrets",
        "run.ray=false",
        "tracking.experiment=secrets",
    ]
    command = [sys.executable, "-m", "pipeline.cli", "train", *(a for s in settings for a in ("--set", s))]
    env = os.environ | {
        "HOME": str(tmp_path),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": tracking,
    }
    result = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=300, check=False, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    secrets = [seaweedfs.secret_key, seaweedfs.access_key, PASSWORD]

    leaks = _scan("stdout", result.stdout, secrets) + _scan("stderr", result.stderr, secrets)
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("secrets")
    (run,) = client.search_runs([experiment.experiment_id])
    recorded = repr((run.data.params, run.data.tags, sorted(run.data.metrics), run.info))
    leaks += _scan("MLflow params/tags/metrics", recorded.encode(), secrets)
    assert "data.uri" in run.data.params and "run.storage" in run.data.params  # the scan has text to read
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    files = [path for path in downloaded.rglob("*") if path.is_file()]
    assert any(path.name == "checkpoint.pt" for path in files) and any(p.name == "config.yaml" for p in files)
    for path in files:
        leaks += _scan(f"artifact {path.relative_to(downloaded)}", path.read_bytes(), secrets)
    for name in storage.list_files(runs):
        leaks += _scan(f"s3 {name}", storage.read_bytes(storage.join(runs, name)), secrets)
    assert leaks == [], "\n".join(leaks)


@pytest.mark.parametrize("key", ["tracking.uri", "data.uri", "model.pretrained"])
def test_a_config_holding_credentials_is_refused(key: str) -> None:
    from pipeline.config import ConfigError, load_config

    value = f"https://alice:{PASSWORD}@example.com/x"
    shown = re.escape(f"{key}=https://***@example.com/x holds credentials")
    with pytest.raises(ConfigError, match=shown) as error:
        load_config(None, [f"{key}={value}"])
    assert PASSWORD not in str(error.value)


# Credentials a careless user puts in a location: a secret holding "/" (real AWS secret keys often do), one
# holding "@" and ":", a percent-encoded one before a port, and one in a file:// URI.
CREDENTIAL_URIS = [
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCY@bucket/x", ["wJalrXUtnFEMI", "K7MDENG", "AKIAEXAMPLE"]),
    ("s3://AKIAEXAMPLE:se@cr:et/pa@bucket/x", ["se@cr", "cr:et", "et/pa", "AKIAEXAMPLE"]),
    ("s3://AKIAEXAMPLE:topsecret%2Fvalue@localhost:8333/bucket", ["topsecret", "value", "AKIAEXAMPLE"]),
    ("file://alice:hunter22/x@localhost/tmp/data", ["hunter22", "alice"]),
]
CONFIG = "configs/quickstart_ccnet-tiny_generated-192x192_cpu.yaml"
# Every place a location is given: (arguments with {uri}, what the ERROR line names).
PLACES = [
    (["train", "-c", CONFIG, "--set", "data.uri={uri}"], "data.uri="),
    (["tune", "-c", CONFIG, "--set", "run.storage={uri}"], "run.storage="),
    (["train", "--set", "tracking.uri={uri}"], "tracking.uri="),
    (["data", "prepare", "--dataset", "generated", "--out", "{uri}"], "--out"),
    (["evaluate", "-c", CONFIG, "--checkpoint", "{uri}"], "--checkpoint"),
    (["predict", "--checkpoint", "{uri}", "README.md", "--out", "predicted"], "--checkpoint"),
    (["data", "inspect", "{uri}"], "uri"),
]


@pytest.mark.parametrize("place", PLACES, ids=[" ".join(p[0][:2]) + f" {p[1]}" for p in PLACES])
def test_a_location_with_credentials_is_refused_redacted(
    place: tuple[list[str], str], tmp_path: Path
) -> None:
    """Whatever the secret holds, every message quoting the location redacts it: exit 2, one ERROR line
    naming the key or flag, no piece of the secret in the output, nothing written (no MLflow database)."""
    template, named = place
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= {
        "HOME": str(tmp_path.parent / f"{tmp_path.name}-home"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(ROOT),
    }
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "README.md").write_text("not an image")
    failures = []
    for uri, pieces in CREDENTIAL_URIS:
        command = [sys.executable, "-m", "pipeline.cli", *(a.replace("{uri}", uri) for a in template)]
        result = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env, check=False
        )
        lines = result.stderr.strip().splitlines()
        shown = result.stdout + result.stderr
        if result.returncode != 2 or not lines or not lines[-1].startswith("ERROR") or named not in lines[-1]:
            failures.append(f"{uri}: exit {result.returncode}, {lines[-1:]}")
        if "Traceback" in shown or "***" not in lines[-1]:
            failures.append(f"{uri}: not one redacted ERROR line: {shown[-500:]}")
        failures += [f"{uri}: {piece!r} in the output: {shown[-500:]}" for piece in pieces if piece in shown]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "configs"], "something was written"
    assert failures == [], "\n".join(failures)
