"""The tracker boundary is real: a second backend, written here in 90 lines, is chosen by its URI's scheme
(``pipeline.tracking.BACKENDS``) and records a whole training, its resumption and ``ccnet evaluate``, with
nothing outside ``pipeline/tracking/`` knowing it is not MLflow."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

import pipeline.tracking
from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.io.checkpoints import load, tracking_run_id
from pipeline.tracking.base import Tracker
from pipeline.train.driver import run_training


class JsonLinesTracker:
    """Every call, one JSON line in the file of ``jsonl://<path>``."""

    def __init__(self, uri: str, experiment: str, required: bool = True, settle_timeout: float = 0.0) -> None:
        self.uri, self.experiment = uri, experiment
        self.path = Path(uri.removeprefix("jsonl://"))
        self.run_id: str | None = None
        self.active = False

    def _write(self, event: str, **data: Any) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"run": self.run_id, "event": event, **data}, default=str) + "\n")

    def _events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def start(
        self,
        run_name: str,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        announce: bool = True,
        *,
        resume: bool = False,
        parent_run_id: str | None = None,
    ) -> str | None:
        if run_id is None and resume:
            named = [
                e["run"]
                for e in self._events()
                if e["event"] == "start" and e["name"] == run_name and e["parent"] == parent_run_id
            ]
            run_id = named[-1] if named else None
        self.run_id, self.active = run_id or uuid.uuid4().hex, True
        self._write("start", name=run_name, parent=parent_run_id, tags=tags or {}, resumed=run_id is not None)
        return self.run_id

    def describe(self, text: str) -> None:
        self._write("describe", text=text)

    def registered_checkpoint(self, model_uri: str, folder: str) -> str:
        raise FileNotFoundError(model_uri)

    def browse_hint(self, run_id: str | None = None, experiment_runs: bool = False) -> str:
        return f"grep {run_id or self.run_id} {self.path}"

    def log_params(self, params: dict[str, object]) -> None:
        self._write("params", params=params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write("metrics", metrics=metrics, step=step)

    def flush(self) -> bool:
        return True

    def settle(self, timeout: float | None = None) -> bool:
        return True

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write("tags", tags=tags)

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any], context: str) -> None:
        self._write("dataset", name=name, digest=digest, context=context)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._write("artifact", file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write("artifact", file=artifact_file, text=text)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._write("artifact", file=f"{artifact_path}/{Path(local_path).name}")

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._write("artifact", file=artifact_file)

    def log_model(
        self,
        model: Any,
        name: str = "model",
        registered_name: str | None = None,
        metrics: dict[str, float] | None = None,
        checkpoint: str | None = None,
        version_tags: dict[str, str] | None = None,
        onnx_file: str | None = None,
    ) -> str | None:
        self._write("model", name=name, registered=registered_name, onnx=onnx_file is not None)
        return "1"

    def end(self, status: str = "FINISHED") -> None:
        self.active = False
        self._write("end", status=status)

    def end_children(self, status: str, failed_since: float | None = None) -> int:
        return 0


def test_a_second_backend_records_a_training_its_resumption_and_an_evaluation(
    generated_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    tracker: Tracker = JsonLinesTracker("jsonl:///x", "e")  # it satisfies the protocol (mypy checks it)
    assert not tracker.active
    monkeypatch.setitem(pipeline.tracking.BACKENDS, "jsonl", JsonLinesTracker)
    log = tmp_path / "runs.jsonl"
    settings = [
        f"data.uri={generated_dataset()}",
        "data.crop_size=48",
        "data.batch_size=2",
        "run.ray=false",
        "train.log_every=1",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "eval.scales=[1.0]",
        f"run.storage={tmp_path / 'runs'}",
        "run.name=jsonl",
        f"tracking.uri=jsonl://{log}",
    ]
    report = run_training(load_config(None, [*settings, "train.iterations=2"]))
    resumed = run_training(load_config(None, [*settings, "train.iterations=4"]))

    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert resumed.run_id == report.run_id and {e["run"] for e in events} == {report.run_id}
    starts = [e for e in events if e["event"] == "start"]
    assert [e["resumed"] for e in starts] == [False, True]
    assert sorted(e["step"] for e in events if e["event"] == "metrics" and "train/loss" in e["metrics"]) == [
        1,
        2,
        3,
        4,
    ]
    assert [e["status"] for e in events if e["event"] == "end"] == ["FINISHED", "FINISHED"]
    assert "trained 4 iterations" in [e for e in events if e["event"] == "describe"][-1]["text"]
    files = {e["file"] for e in events if e["event"] == "artifact"}
    assert {"config.yaml", "evaluation/results.md", "plots/confusion_matrix.png"} <= files
    assert [e["registered"] for e in events if e["event"] == "model"] == ["ccnet-generated"] * 2
    assert report.tracker.browse_hint() == f"grep {report.run_id} {log}"

    state = load(report.best_checkpoint)
    assert tracking_run_id(state) == report.run_id
    # ccnet evaluate continues the training's run, in the same file
    assert main(["evaluate", "--checkpoint", report.best_checkpoint]) == 0
    capsys.readouterr()
    last = [json.loads(line) for line in log.read_text().splitlines()][-3:]
    assert [e["event"] for e in last] == ["start", "artifact", "end"]
    assert last[1]["file"].startswith("evaluation/iteration_") and last[0]["run"] == report.run_id


def test_an_older_checkpoint_names_its_run_under_the_old_key() -> None:
    assert tracking_run_id({"mlflow_run_id": "abc"}) == "abc"
    assert tracking_run_id({"tracking_run_id": "def", "mlflow_run_id": None}) == "def"
    assert tracking_run_id({}) is None
