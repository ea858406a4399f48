"""The training job on real parts: 2 Ray Train workers (gloo, CPU), shards and checkpoints on SeaweedFS,
tracking on an MLflow server."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("loader", ["torch", "ray"])
def test_two_workers_on_s3_and_mlflow(
    tmp_path: Path, s3_env: str, mlflow_server, monkeypatch, loader: str  # noqa: ANN001
) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.run import run_training

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    source = build_source("generated", None, image_size=(48, 48), counts={"train": 16, "val": 4})
    data_uri, _ = write_shards(source, storage.join(s3_env, "datasets"), workers=1, progress=False)
    config = load_config(None, [
        f"data.uri={data_uri}", "data.crop_size=48", "data.batch_size=2", "train.iterations=4",
        "train.log_every=1", "train.checkpoint_every=2", "train.eval_every=4", "eval.scales=[1.0, 1.5]",
        f"run.storage={storage.join(s3_env, 'runs')}", "run.name=two-workers", "run.num_workers=2",
        "run.cpus_per_worker=0.5", f"tracking.uri={mlflow_server.uri}", f"tracking.experiment=ray-{loader}",
        f"data.loader={loader}",
    ])
    ray.init(num_cpus=2, include_dashboard=False)  # after s3_env: workers inherit the AWS_* settings
    try:
        report = run_training(config)
        if loader == "torch":  # the same command again, now for 6 iterations: resumes at 4, same MLflow run
            config.train.iterations = 6
            resumed = run_training(config)
            assert resumed.run_id == report.run_id
    finally:
        ray.shutdown()

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["run.num_workers"] == "2" and run.data.params["model.name"] == "ccnet_tiny"
    losses = client.get_metric_history(report.run_id, "train/loss")
    assert [m.step for m in losses] == ([1, 2, 3, 4, 5, 6] if loader == "torch" else [1, 2, 3, 4])
    assert "final/multi-scale_flip/mIoU" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(report.run_id, "checkpoints/best")}
    assert artifacts == {"checkpoints/best/checkpoint.pt"}
    assert {a.path for a in client.list_artifacts(report.run_id, "evaluation")} == {"evaluation/results.md"}
    files = storage.list_files(config.run.storage)
    ray_checkpoints = [name for name in files if name.endswith("checkpoint.pt")]
    assert "two-workers/best/checkpoint.pt" in ray_checkpoints
    assert len(ray_checkpoints) >= 2  # Ray's periodic checkpoints on S3 next to the best one
