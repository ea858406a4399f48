"""What ``ccnet submit`` sends to a Ray cluster, checked before anything leaves this machine: the entry point,
the runtime environment (no secrets, named variables only), the pinned requirements, and the one-line errors
for a bad job, config, path or value. The submission itself is tested on the local stack
(``tests/infra/test_end_to_end.py``)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pipeline.cli.submit import SubmitError, build_submission, job_env, job_names, pinned_requirements
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[3]
CONFIG = "configs/quickstart_ccnet-tiny_generated-192x192_cpu.yaml"
REMOTE = ["data.uri=s3://ccnet/datasets/generated/v1", "run.storage=s3://ccnet/runs"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "RAY_USAGE_STATS_ENABLED",
        "MLFLOW_DISABLE_TELEMETRY",
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)


def test_jobs_are_the_modules_of_jobs() -> None:
    assert set(job_names()) == {p.stem for p in (ROOT / "jobs").glob("*.py") if p.stem != "__init__"}


def test_entrypoint_runs_the_job_module_with_quoted_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-secret-value-123")
    space = "tune.space={train.lr: {loguniform: [0.001, 0.1]}}"
    submission = build_submission("tune", [], config_path=CONFIG, overrides=[*REMOTE, space])
    assert shlex.split(submission.entrypoint) == [
        "python",
        "-m",
        "jobs.tune",
        "-c",
        CONFIG,
        "--set",
        REMOTE[0],
        "--set",
        REMOTE[1],
        "--set",
        space,
    ]
    env = submission.runtime_env
    assert env["working_dir"] == str(ROOT) and ".venv" in env["excludes"] and "runs" in env["excludes"]
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}  # only named, non-secret values
    assert "pip" not in env
    assert "a-secret-value-123" not in repr(submission)
    assert submission.submission_id.startswith("ccnet-tune-")


def test_job_arguments_after_the_config() -> None:
    submission = build_submission("prepare_data", ["--dataset", "generated", "--out", "s3://ccnet/datasets"])
    assert (
        submission.entrypoint == "python -m jobs.prepare_data --dataset generated --out s3://ccnet/datasets"
    )


def test_pip_carries_the_projects_pins() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = pinned_requirements()
    assert {p.replace(" ", "") for p in pins} == {d.replace(" ", "") for d in declared}
    assert any(pin.startswith("torch==") for pin in pins)
    submission = build_submission("train", [], config_path=CONFIG, overrides=REMOTE, pip=True)
    assert submission.runtime_env["pip"]["packages"] == pins


@pytest.mark.parametrize(
    "name",
    [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SESSION_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "RAY_AUTH_TOKEN",
        "HF_API_KEY",
    ],
)
def test_secret_names_are_refused(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "value")
    with pytest.raises(SubmitError, match=f"--env {name}: secrets do not travel"):
        job_env([name])


def test_named_variables_travel_and_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCNET_NOTE", "nightly")
    assert job_env(["CCNET_NOTE"]) == {"CCNET_NOTE": "nightly"}
    with pytest.raises(SubmitError, match="--env CCNET_MISSING: not set"):
        job_env(["CCNET_MISSING"])


def test_credentials_in_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:hunter22@mlflow.example.com")
    with pytest.raises(SubmitError, match="MLFLOW_TRACKING_URI holds credentials") as error:
        job_env([])
    assert "hunter22" not in str(error.value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match=r"tracking.uri=https://\*\*\*@mlflow.example.com holds"):
        build_submission(
            "train",
            [],
            config_path=CONFIG,
            overrides=[*REMOTE, "tracking.uri=https://alice:hunter22@mlflow.example.com"],
        )
    with pytest.raises(SubmitError, match=r"argument holds credentials \(s3://\*\*\*@bucket/x\)"):
        build_submission("prepare_data", ["--out", "s3://key:secret@bucket/x"])


@pytest.mark.parametrize(
    ("job", "config", "overrides", "message"),
    [
        ("fit", None, [], "unknown job 'fit': expected one of evaluate, prepare_data"),
        ("train", CONFIG, [], "data.uri=runs/datasets/generated/v1 is a relative path"),
        ("train", CONFIG, [REMOTE[0]], "run.storage=runs/checkpoints is a relative path"),
    ],
)
def test_bad_submissions_fail_here(job: str, config: str | None, overrides: list[str], message: str) -> None:
    with pytest.raises((SubmitError, ConfigError), match=message):
        build_submission(job, [], config_path=config, overrides=overrides)


def test_a_config_outside_the_working_dir_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / CONFIG).read_text())
    with pytest.raises(SubmitError, match=f"config {outside} is outside the working dir {ROOT}"):
        build_submission("train", [], config_path=str(outside), overrides=REMOTE)
    assert build_submission("train", [], config_path=str(outside), overrides=REMOTE, working_dir=tmp_path)


def test_config_errors_fail_before_submitting() -> None:
    with pytest.raises(ConfigError, match="train.lrr"):
        build_submission("train", [], config_path=CONFIG, overrides=[*REMOTE, "train.lrr=0.1"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_unreachable_job_server_is_one_line() -> None:
    result = _cli("jobs", "list", "--address", "http://127.0.0.1:9")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("ERROR cannot reach the Ray job server at http://127.0.0.1:9")
    )


def test_no_address_is_one_line() -> None:
    result = _cli("submit", "prepare_data", "--", "--dataset", "generated", "--out", "s3://ccnet/datasets")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "ERROR no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS"
    )


def test_job_arguments_belong_to_submit_only() -> None:
    result = _cli("train", "--", "--anything")
    assert result.returncode == 2 and "after -- are for `ccnet submit`" in result.stderr
