"""Tracking on MLflow: an embedded sqlite store and a real ``mlflow server`` (``mlflow_server``), read back
with MLflow's own client, never through the Tracker; resume, redaction, unreachable servers, an outage."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pipeline.config import Config
from pipeline.tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    TrackingError,
    resolve_tracking_uri,
)
from pipeline.tracking.mlflow_store import browse_hint, find_run, source_name

EXPERIMENT = "ccnet-tests"


def _client(uri: str) -> Any:
    from mlflow import MlflowClient  # imported late: the Tracker sets MLFLOW_DISABLE_TELEMETRY first

    return MlflowClient(tracking_uri=uri)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _figure() -> Figure:
    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    return figure


def _steps(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def sqlite_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tracking") / "runs"


@pytest.fixture(scope="module")
def sqlite_uri(sqlite_root: Path) -> str:
    """One embedded store for the module (creating one costs about a second); runs are told apart by name."""
    return resolve_tracking_uri(None, default_dir=str(sqlite_root))


def test_resolve_tracking_uri_prefers_config_then_env_then_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri("http://from-config:5000") == "http://from-config:5000"
    assert resolve_tracking_uri(None) == "http://from-env:5000"
    assert resolve_tracking_uri("") == "http://from-env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, default_dir="runs") == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert (tmp_path / "runs").is_dir()


def _log_round_trip(tracker: Tracker, config: Config) -> str:
    run_id = tracker.start("round-trip", tags={"ccnet.model": config.model.name})
    assert run_id and tracker.active and tracker.run_id == run_id
    tracker.log_params(config.flat())
    for step in range(5):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": torch.tensor(0.01)}, step=step * 10)
    tracker.log_dict({"classes": ["road", "car"]}, "meta/classes.json")
    tracker.log_text("| protocol | mIoU |\n", "evaluation/results.md")
    tracker.log_figure(_figure(), "plots/curve.png")
    tracker.end()
    assert not tracker.active and tracker.run_id == run_id
    return run_id


def _check_round_trip(uri: str, run_id: str, config: Config) -> Any:
    client = _client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "round-trip"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.data.tags["ccnet.model"] == config.model.name
    assert run.data.params["train.lr"] == "0.01"
    assert run.data.params["eval.scales"] == "[0.75, 1.0, 1.25, 1.5, 1.75]"
    assert run.data.params["model.recurrence"] == "None"
    assert set(run.data.params) == set(config.flat())
    assert _steps(uri, run_id, "train/loss") == [(0, 1.0), (10, 0.5), (20, 1 / 3), (30, 0.25), (40, 0.2)]
    assert [v for _, v in _steps(uri, run_id, "train/lr")] == pytest.approx([0.01] * 5)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"meta", "evaluation", "plots"} <= top
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/curve.png"]
    assert client.download_artifacts(run_id, "evaluation/results.md").endswith("results.md")
    return run


def test_embedded_sqlite_round_trip(
    sqlite_uri: str, sqlite_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config()
    run_id = _log_round_trip(MlflowTracker(sqlite_uri, EXPERIMENT), config)
    run = _check_round_trip(sqlite_uri, run_id, config)
    # Artifacts beside the database, not in ./mlruns of whatever the cwd was.
    assert run.info.artifact_uri.startswith((sqlite_root / "artifacts").as_uri())
    assert (sqlite_root / "artifacts").is_dir()
    _log_and_load_model(sqlite_uri, run_id, monkeypatch)


def test_resume_continues_the_same_run(sqlite_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    first = MlflowTracker(sqlite_uri, EXPERIMENT)
    run_id = first.start("resumable")
    first.log_params({"train.lr": 0.01, "train.iterations": 100})
    first.log_metrics({"loss": 3.0}, step=0)
    first.log_metrics({"loss": 2.0}, step=1)
    first.end("KILLED")  # the job died

    second = MlflowTracker(sqlite_uri, EXPERIMENT)
    assert second.start("resumable", run_id=run_id) == run_id
    assert _client(sqlite_uri).get_run(run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        second.log_params({"train.lr": 0.01})  # unchanged: skipped, not refused
        second.log_params({"train.iterations": 200})  # changed: MLflow keeps the first value
    assert "train.iterations keeps its first value '100'" in caplog.text
    second.log_metrics({"loss": 1.0}, step=2)
    second.end()

    client = _client(sqlite_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.01", "train.iterations": "100"}
    assert _steps(sqlite_uri, run_id, "loss") == [(0, 3.0), (1, 2.0), (2, 1.0)]
    same_name = client.search_runs([run.info.experiment_id], "attributes.run_name = 'resumable'")
    assert [r.info.run_id for r in same_name] == [run_id]


def test_a_stopped_search_marks_its_trials_killed(sqlite_uri: str) -> None:
    """end_children: the trials still RUNNING are KILLED, and so is one that ended FAILED after the stop
    (its process saw the stop as an error) or after the search marked it; one that failed before the stop
    stays FAILED."""
    parent = MlflowTracker(sqlite_uri, EXPERIMENT)
    parent_id = parent.start("stopped-search")
    trials = {}
    for name in ("running", "failed-before", "failed-after", "finished", "failed-later"):
        trial = MlflowTracker(sqlite_uri, EXPERIMENT)
        trials[name] = (trial, trial.start(f"stopped-search_{name}", parent_run_id=parent_id))
    trials["failed-before"][0].end("FAILED")
    trials["finished"][0].end()
    time.sleep(0.01)  # end times are in milliseconds
    stopped_at = time.time()
    trials["failed-after"][0].end("FAILED")
    assert parent.end_children("KILLED", failed_since=stopped_at) == 3
    trials["failed-later"][0].end("FAILED")  # its process saw the stop only after the search marked it
    parent.end("KILLED")
    client = _client(sqlite_uri)
    status = {name: client.get_run(run_id).info.status for name, (_, run_id) in trials.items()}
    assert status == {
        "running": "KILLED",
        "failed-before": "FAILED",
        "failed-after": "KILLED",
        "finished": "FINISHED",
        "failed-later": "KILLED",
    }


def test_a_resumed_run_logs_no_step_twice(sqlite_uri: str) -> None:
    """A resume repeats the steps between its checkpoint and the interruption: the record keeps the first."""
    first = MlflowTracker(sqlite_uri, EXPERIMENT)
    run_id = first.start("interrupted")
    for step in range(1, 6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.end("KILLED")  # the last checkpoint was at step 3
    second = MlflowTracker(sqlite_uri, EXPERIMENT)
    second.start("interrupted", run_id=run_id)
    for step in range(4, 8):
        second.log_metrics({"train/loss": 10.0 + step, "val/mIoU": 0.5}, step=step)
    second.end()
    assert _steps(sqlite_uri, run_id, "train/loss") == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 5.0),
        (6, 16.0),
        (7, 17.0),
    ]
    assert [step for step, _ in _steps(sqlite_uri, run_id, "val/mIoU")] == [4, 5, 6, 7]  # new keys: all


def test_resume_of_a_missing_run_starts_a_new_one(sqlite_uri: str) -> None:
    tracker = MlflowTracker(sqlite_uri, EXPERIMENT)
    run_id = tracker.start("gone", run_id="0" * 32)
    assert run_id and run_id != "0" * 32
    tracker.end()


def test_secrets_are_redacted_in_what_mlflow_stores(sqlite_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-from-env")
    tracker = MlflowTracker(sqlite_uri, EXPERIMENT)
    run_id = tracker.start("secrets", tags={"source": "https://bob:tagpass@git.example/repo"})
    tracker.log_params(
        {
            "tracking.uri": "http://alice:hunter2@mlflow.example:5000",
            "aws_secret_access_key": "plain-secret-value",
            "storage.AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
            "note": "endpoint key s3cr3t-from-env",
            "run.name": "x" * 7000,
        }
    )
    tracker.end()
    run = _client(sqlite_uri).get_run(run_id)
    params = run.data.params
    assert params["tracking.uri"] == "http://***@mlflow.example:5000"
    assert params["aws_secret_access_key"] == "***"
    assert params["storage.AWS_ACCESS_KEY_ID"] == "***"
    assert params["note"] == "endpoint key ***"
    assert len(params["run.name"]) == 6000 and params["run.name"].endswith("...")
    assert run.data.tags["source"] == "https://***@git.example/repo"
    stored = " ".join([*params.values(), *run.data.tags.values()])
    for secret in ("hunter2", "plain-secret-value", "AKIAEXAMPLE", "s3cr3t-from-env", "tagpass"):
        assert secret not in stored


def test_find_run_returns_the_latest_run_of_that_name(sqlite_uri: str) -> None:
    ids = []
    for name in ("alpha", "beta", "alpha"):
        tracker = MlflowTracker(sqlite_uri, EXPERIMENT)
        ids.append(tracker.start(name))
        tracker.end()
        time.sleep(0.01)  # distinct start times
    assert find_run(sqlite_uri, EXPERIMENT, "alpha") == ids[2]
    assert find_run(sqlite_uri, EXPERIMENT, "beta") == ids[1]
    assert find_run(sqlite_uri, EXPERIMENT, "it's-missing") is None
    assert find_run(sqlite_uri, "no-such-experiment", "alpha") is None


def test_find_run_under_a_parent_returns_that_parents_nested_run(sqlite_uri: str) -> None:
    parents, children = [], []
    for _ in range(2):  # the same search twice: each parent has a nested run of the same name
        parent = MlflowTracker(sqlite_uri, EXPERIMENT)
        parents.append(parent.start("search"))
        child = MlflowTracker(sqlite_uri, EXPERIMENT)
        children.append(child.start("search_trial", parent_run_id=parents[-1]))
        child.end()
        parent.end()
    assert find_run(sqlite_uri, EXPERIMENT, "search_trial", parent_run_id=parents[0]) == children[0]
    assert find_run(sqlite_uri, EXPERIMENT, "search_trial", parent_run_id=parents[1]) == children[1]
    assert find_run(sqlite_uri, EXPERIMENT, "search_trial", parent_run_id="0" * 32) is None
    # The tracker's own verb: resume the run of that name under that parent, or start a new nested one.
    resumed = MlflowTracker(sqlite_uri, EXPERIMENT)
    assert resumed.start("search_trial", resume=True, parent_run_id=parents[0]) == children[0]
    resumed.describe("a trial, resumed")
    resumed.end()
    run = _client(sqlite_uri).get_run(children[0])
    assert run.data.tags["mlflow.parentRunId"] == parents[0]
    assert run.data.tags["mlflow.note.content"] == "a trial, resumed"
    fresh = MlflowTracker(sqlite_uri, EXPERIMENT)
    new_id = fresh.start("search_trial", resume=True, parent_run_id="0" * 32)
    fresh.end()
    assert new_id not in children
    assert _client(sqlite_uri).get_run(new_id).data.tags["mlflow.parentRunId"] == "0" * 32


def test_null_tracker_records_nothing(tmp_path: Path) -> None:
    tracker = NullTracker()
    assert tracker.start("x") is None and tracker.run_id is None and not tracker.active
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_dict({}, "a.json")
    tracker.log_text("", "a.txt")
    tracker.log_figure(_figure(), "a.png")
    tracker.log_artifact(str(tmp_path), "folder")
    tracker.log_model(torch.nn.Linear(1, 1))
    tracker.end()


def _log_and_load_model(uri: str, run_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logs a tiny model into run ``run_id`` (resumed) and checks MLflow stored it with the run, in the
    run's experiment, and that it loads back computing the same function."""
    import mlflow.pytorch

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    resumed = MlflowTracker(uri, EXPERIMENT)
    resumed.start("round-trip", run_id=run_id)
    resumed.log_model(model, name="model")
    resumed.end()
    client = _client(uri)
    run = client.get_run(run_id)
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "model" and logged.source_run_id == run_id
    assert logged.experiment_id == run.info.experiment_id  # not the Default experiment
    assert {"MLmodel", "data"} <= {a.path for a in client.list_logged_model_artifacts(output.model_id)}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where load_model resolves models:/
    loaded = mlflow.pytorch.load_model(f"models:/{output.model_id}")
    inputs = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(loaded(inputs), model(inputs))


def test_registered_versions_get_aliases_and_load_without_the_repository(
    sqlite_uri: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """candidate is the newest version, champion the best val_mIoU; the model loads in a process where the
    repository is not importable (its code travels with it), with its checkpoint as an extra file."""
    import json
    import subprocess
    import sys

    from ccnet import build_ccnet
    from ccnet.inference import LogitsOnly

    torch.manual_seed(0)
    model = LogitsOnly(build_ccnet("ccnet_tiny", 3)).eval()
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"weights")
    versions = []
    for score in (0.5, 0.7, 0.6):
        tracker = MlflowTracker(sqlite_uri, EXPERIMENT)
        tracker.start("registered")
        versions.append(
            tracker.log_model(
                model, registered_name="ccnet-test", metrics={"val_mIoU": score}, checkpoint=str(checkpoint)
            )
        )
        tracker.end()
    assert versions == ["1", "2", "3"]
    # MLflow prints its own lines about a registration to stderr; ours go through logging
    printed = capfd.readouterr()
    assert "registered model" not in (printed.out + printed.err).lower()
    client = _client(sqlite_uri)
    assert str(client.get_model_version_by_alias("ccnet-test", "candidate").version) == "3"
    champion = client.get_model_version_by_alias("ccnet-test", "champion")
    assert str(champion.version) == "2" and champion.tags["val_mIoU"] == "0.7"
    model_id = champion.model_id or champion.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert {m.key: m.value for m in logged.metrics} == {"val_mIoU": 0.7}  # the eval metrics, linked
    assert model_id in {o.model_id for o in client.get_run(champion.run_id).outputs.model_outputs}

    image = torch.randn(2, 3, 40, 56)
    torch.save(image, tmp_path / "image.pt")
    repo = str(Path(__file__).parents[2])
    code = f"""
import importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", "")]
sys.path[:] = [p for p in sys.path if p not in ("", ".", {repo!r})]  # the checkout (its .venv may stay)
for name in [m for m in sys.modules if m == "ccnet" or m.startswith("ccnet.")]:
    del sys.modules[name]
assert importlib.util.find_spec("ccnet") is None, "the repository is still importable"
import mlflow, mlflow.pytorch, torch
model = mlflow.pytorch.load_model("models:/ccnet-test@champion")
logits = model(torch.load("image.pt"))
from mlflow.artifacts import download_artifacts
folder = download_artifacts("models:/ccnet-test@champion")
print(json.dumps({{"shape": list(logits.shape), "sum": float(logits.sum()),
                  "checkpoint": open(folder + "/extra_files/checkpoint.pt", "rb").read().decode()}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": sqlite_uri}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.inference_mode():
        expected = model(image)
    assert loaded["shape"] == [2, 3, 40, 56] and loaded["checkpoint"] == "weights"
    assert loaded["sum"] == pytest.approx(float(expected.sum()), rel=1e-4, abs=1e-3)


def test_server_round_trip_with_model(mlflow_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config()
    uri = mlflow_server.uri
    run_id = _log_round_trip(MlflowTracker(uri, EXPERIMENT), config)
    _check_round_trip(uri, run_id, config)
    assert find_run(uri, EXPERIMENT, "round-trip") == run_id
    _log_and_load_model(uri, run_id, monkeypatch)


def test_experiments_open_as_model_training(mlflow_server: Any) -> None:
    """MLflow 3's UI opens an experiment without a kind on its GenAI (traces) page: every experiment the
    project creates, or trains into, is of the kind "custom model development"; a kind set by a user stays."""
    client = _client(mlflow_server.uri)
    existing = client.create_experiment("made-by-hand")
    chosen = client.create_experiment("chosen-kind", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("created-here", "made-by-hand", "chosen-kind"):
        tracker = MlflowTracker(mlflow_server.uri, name)
        tracker.start("kind")
        tracker.end()
    kinds = {
        name: client.get_experiment_by_name(name).tags.get("mlflow.experimentKind")
        for name in ("created-here", "made-by-hand", "chosen-kind")
    }
    assert kinds == {
        "created-here": "custom_model_development",
        "made-by-hand": "custom_model_development",
        "chosen-kind": "genai_development",
    }
    assert existing and chosen
    # The commands link the run's page (which opens "Training runs" whatever the UI's GenAI switch says).
    tracker = MlflowTracker(mlflow_server.uri, "created-here")
    run_id = tracker.start("linked")
    tracker.end()
    experiment = client.get_experiment_by_name("created-here").experiment_id
    page = f"{mlflow_server.uri}/#/experiments/{experiment}/runs/{run_id}"
    assert browse_hint(mlflow_server.uri, run_id) == page
    assert browse_hint(mlflow_server.uri, run_id, experiment_runs=True).endswith(f"/{experiment}/runs")


def test_a_local_store_is_browsed_with_mlflow_ui(sqlite_uri: str) -> None:
    tracker = MlflowTracker(sqlite_uri, EXPERIMENT)
    run_id = tracker.start("browsed")
    tracker.end()
    experiment = _client(sqlite_uri).get_run(run_id).info.experiment_id
    assert browse_hint(sqlite_uri, run_id) == (
        f"mlflow ui --backend-store-uri {sqlite_uri}, then "
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"
    )
    assert browse_hint(sqlite_uri, None).endswith("then http://127.0.0.1:5000/")


def test_unreachable_server_fails_fast_when_required() -> None:
    uri = f"http://alice:hunter2@127.0.0.1:{_closed_port()}"
    began = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        MlflowTracker(uri, EXPERIMENT, required=True).start("nobody-listens")
    assert time.monotonic() - began < 5
    message = str(caught.value)
    assert "127.0.0.1" in message and "hunter2" not in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_unreachable_server_becomes_a_no_op_when_optional(caplog: pytest.LogCaptureFixture) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    tracker = MlflowTracker(uri, EXPERIMENT, required=False)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        assert find_run(uri, EXPERIMENT, "x") is None
        assert tracker.start("nobody-listens") is None
    assert "going on without tracking" in caplog.text
    assert not tracker.active and tracker.run_id is None
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_text("x", "x.txt")
    tracker.end()
    assert time.monotonic() - began < 5


def test_outage_buffers_metrics_and_the_next_call_or_end_flushes_them(
    mlflow_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    uri = mlflow_server.uri
    tracker = MlflowTracker(uri, EXPERIMENT)
    run_id = tracker.start("outage")
    closing = MlflowTracker(uri, EXPERIMENT)  # a second run, ended right after the outage: end() must flush
    closing_id = closing.start("outage-then-end")
    for step in range(3):
        tracker.log_metrics({"loss": float(10 - step)}, step=step)
    try:
        mlflow_server.stop()
        with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
            for step in range(3, 6):
                began = time.monotonic()
                tracker.log_metrics({"loss": float(10 - step)}, step=step)
                assert time.monotonic() - began < 3, "a log call stalled during the outage"
            tracker.log_params({"during.outage": "yes"})
            tracker.log_text("lost", "outage.txt")  # artifacts are not buffered: dropped, no raise
            closing.log_metrics({"acc": 0.5}, step=1)
        unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
        assert len(unreachable) == 2  # once per outage and tracker
        assert "artifact outage.txt not logged" in caplog.text
    finally:
        mlflow_server.start()
    tracker.log_metrics({"loss": 4.0, "grad_norm": float("nan")}, step=6)  # a non-finite value is stored too
    assert _steps(uri, run_id, "loss") == [(step, float(10 - step)) for step in range(7)]
    assert np.isnan(_steps(uri, run_id, "grad_norm")[0][1])
    assert _client(uri).get_run(run_id).data.params == {"during.outage": "yes"}
    history = _client(uri).get_metric_history(run_id, "loss")
    times = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
    assert times == sorted(times)  # the original times, not the flush time
    tracker.end()
    assert _client(uri).get_run(run_id).info.status == "FINISHED"
    closing.end()
    assert _steps(uri, closing_id, "acc") == [(1, 0.5)]
    assert _client(uri).get_run(closing_id).info.status == "FINISHED"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/opt/venv/bin/ccnet", "train", "-c", "x.yaml"], "ccnet train"),
        (["/srv/work/jobs/train.py", "-c", "x.yaml"], "jobs.train"),  # a submitted job: python -m jobs.train
        (["/repo/pipeline/cli/__main__.py", "--debug", "tune"], "ccnet"),
        ([], "ccnet"),
    ],
)
def test_the_source_name_says_what_started_the_run(argv: list[str], expected: str) -> None:
    assert source_name(argv) == expected
