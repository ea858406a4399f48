"""A 2-trial search with ASHA on a local Ray, recorded as nested MLflow runs, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_trial_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.tune import run_search

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    source = build_source("generated", None, image_size=(48, 48), counts={"train": 8, "val": 2})
    data_uri, _ = write_shards(source, str(tmp_path / "data"), workers=1, progress=False)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(None, [
        f"data.uri={data_uri}", "data.batch_size=4", "train.iterations=4", "train.checkpoint_every=2",
        "train.eval_every=2", "train.log_every=2", "eval.scales=[1.0]", f"run.storage={tmp_path / 'runs'}",
        f"tracking.uri={tracking}", "run.cpus_per_worker=0.5", "tune.name=tiny-search", "tune.num_samples=2",
        "tune.grace_period=2",
        "tune.space={train.lr: {loguniform: [0.001, 0.1]}, data.crop_size: {choice: [32, 48]}}",
    ])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        report = run_search(config)
        again = run_search(config)  # the same search name: restored, its finished trials not run again
    finally:
        ray.shutdown()
    assert again.parent_run_id == report.parent_run_id
    assert sorted(again.table.splitlines()) == sorted(report.table.splitlines())  # same trials and results
    assert report.table.count("\n") == 3  # header, rule, two trials
    assert set(report.best) == {"train.lr", "data.crop_size"} and 0.0 <= report.best_value <= 1.0

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("ccnet")
    runs = client.search_runs([experiment.experiment_id])
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == report.parent_run_id]
    assert len(children) == 2
    for child in children:
        assert client.get_metric_history(child.info.run_id, "train/loss")
        assert "sampled.train.lr" in child.data.params
    artifacts = {a.path for a in client.list_artifacts(report.parent_run_id, "search")}
    assert artifacts == {"search/results.md", "search/best.json", "search/best_config.yaml"}
