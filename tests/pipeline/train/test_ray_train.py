"""The training job on real parts: 2 Ray Train workers (gloo, CPU), shards and checkpoints on SeaweedFS,
tracking on an MLflow server; and the Ray Data input, unit by unit."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.data.readers import ShardDataset
from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards
from pipeline.io import checkpoints, storage
from pipeline.train.ray_train import Unregistered, train_datasets, unregistered_checkpoints
from pipeline.train.spec import RunSpec


class CapturedDataset:
    """Stands in for the lazy Ray Dataset: keeps the arguments that built it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def select_columns(self, columns: list[str]) -> CapturedDataset:
        self.columns = columns
        return self


def test_ray_data_pads_crops_with_the_manifests_ignore_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.train.ray_train

    source = build_source("generated", None, image_size=(48, 48), counts={"train": 2, "val": 1})
    source.ignore_index = 250  # the manifest's; only the crop padding is looked at (the rim keeps 255)
    data_uri, _ = write_shards(source, str(tmp_path), workers=1, progress=False)
    monkeypatch.setattr(pipeline.train.ray_train, "ray_dataset", CapturedDataset)
    config = load_config(
        None,
        [
            f"data.uri={data_uri}",
            "data.loader=ray",
            "data.crop_size=64",
            "data.scale_min=1.0",
            "data.scale_max=1.0",
        ],
    )
    dataset = train_datasets(RunSpec.of(config))["train"]
    assert dataset.args == (data_uri, "train") and dataset.columns == ["image", "label"]
    # The Ray path's transform on a real sample: a 64 crop of a 48 image always holds padding.
    label = ShardDataset(data_uri, "train", transform=dataset.kwargs["transform"])[0]["label"]
    assert label.shape == (64, 64)
    assert (label == 250).sum() >= 64 * 64 - 48 * 48
    torch_loader = load_config(None, [f"data.uri={data_uri}"])
    assert train_datasets(RunSpec.of(torch_loader)) == {}  # the torch loader: none


ORPHAN = "checkpoint_2099-01-01_00-00-00.000000"


def _latest_registered(run_folder: str) -> dict:
    snapshot = json.loads(storage.read_bytes(storage.join(run_folder, "checkpoint_manager_snapshot.json")))
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    return checkpoints.load(storage.join(run_folder, latest))


def _orphan_checkpoint(run_folder: str, iteration: int, best_miou: float) -> None:
    """A checkpoint folder Ray does not list: the newest registered one, relabelled as ``iteration`` and
    marked with ``best_miou`` (which a run resumed from it carries on)."""
    state = _latest_registered(run_folder)
    state["iteration"], state["best_miou"] = iteration, best_miou
    storage.write_bytes(storage.join(run_folder, ORPHAN, "checkpoint.pt"), checkpoints.to_bytes(state))


def test_unregistered_checkpoints_are_found_and_the_newest_whole_one_chosen(tmp_path: Path) -> None:
    folder = str(tmp_path / "run")
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a", "metrics": {"iteration": 10}}]}
    storage.write_bytes(f"{folder}/checkpoint_manager_snapshot.json", json.dumps(snapshot).encode())
    for name, iteration in (("checkpoint_a", 10), ("checkpoint_b", 15), ("checkpoint_c", 8)):
        state = {"model": {}, "iteration": iteration}
        storage.write_bytes(storage.join(folder, name, "checkpoint.pt"), checkpoints.to_bytes(state))
    storage.write_bytes(storage.join(folder, "checkpoint_d", "checkpoint.pt"), b"cut short")
    found = unregistered_checkpoints(folder)
    assert found.folders == ["checkpoint_b", "checkpoint_c", "checkpoint_d"]
    assert found.newest == storage.join(folder, "checkpoint_b", "checkpoint.pt")  # 15 > Ray's 10; c is older
    assert unregistered_checkpoints(str(tmp_path / "new-run")) == Unregistered([], None)
    storage.delete_tree(storage.join(folder, "checkpoint_b"))
    assert not (tmp_path / "run" / "checkpoint_b").exists()


def test_local_storage_on_several_nodes_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.train.resources import warn_if_node_local

    one, two = [{"CPU": 2.0}], [{"CPU": 0.0}, {"CPU": 1.0}]
    with caplog.at_level(logging.WARNING):
        assert not warn_if_node_local("/data/runs", one) and not warn_if_node_local("s3://b/runs", two)
        assert not caplog.records
        assert warn_if_node_local("/data/runs", two)
    (record,) = caplog.records
    assert "run.storage=/data/runs is a local folder but the Ray cluster has 2 nodes" in record.getMessage()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "ray"])
def test_two_workers_on_s3_and_mlflow(
    tmp_path: Path,
    s3_env: str,
    mlflow_server,
    monkeypatch,
    loader: str,  # noqa: ANN001
    caplog: pytest.LogCaptureFixture,
) -> None:
    import ray
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import run_training

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    source = build_source("generated", None, image_size=(48, 48), counts={"train": 16, "val": 4})
    data_uri, _ = write_shards(source, storage.join(s3_env, "datasets"), workers=1, progress=False)
    config = load_config(
        None,
        [
            f"data.uri={data_uri}",
            "data.crop_size=48",
            "data.batch_size=2",
            "train.iterations=4",
            "train.log_every=1",
            "train.checkpoint_every=2",
            "train.eval_every=4",
            "eval.scales=[1.0, 1.5]",
            f"run.storage={storage.join(s3_env, 'runs')}",
            "run.name=two-workers",
            "run.num_workers=2",
            "run.cpus_per_worker=0.5",
            f"tracking.uri={mlflow_server.uri}",
            f"tracking.experiment=ray-{loader}",
            f"data.loader={loader}",
        ],
    )
    ray.init(num_cpus=2, include_dashboard=False)  # after s3_env: workers inherit the AWS_* settings
    try:
        report = run_training(config)
        if loader == "torch":
            # As if a second attempt had written a checkpoint at 5 that Ray never registered and logged steps
            # 5-6 before Ctrl-C: the same command, now for 7 iterations, resumes at 5 (not at Ray's 4), logs
            # no step twice, removes the orphaned folder, and continues the same MLflow run.
            run_folder = storage.join(config.run.storage, config.run.name)
            _orphan_checkpoint(run_folder, iteration=5, best_miou=0.999)
            MlflowClient(mlflow_server.uri).log_batch(
                report.run_id, metrics=[Metric("train/loss", 9.0, 0, step) for step in (5, 6)]
            )
            config = config.replace(train={"iterations": 7})
            with caplog.at_level(logging.INFO):
                resumed = run_training(config)
            assert resumed.run_id == report.run_id
            assert "removed 1 checkpoint folder(s) that Ray never registered" in caplog.text
            # Resumed from the orphan, not from Ray's iteration 4: its marker best mIoU carried on.
            final = _latest_registered(run_folder)
            assert final["iteration"] == 7 and final["best_miou"] == 0.999
            assert [iteration for iteration, _ in final["attention_history"]] == [4, 7]  # 4's carried on
            assert not any(name.startswith(ORPHAN) for name in storage.list_files(config.run.storage))
    finally:
        ray.shutdown()

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["run.num_workers"] == "2" and run.data.params["model.name"] == "ccnet_tiny"
    losses = client.get_metric_history(report.run_id, "train/loss")
    assert sorted(m.step for m in losses) == ([1, 2, 3, 4, 5, 6, 7] if loader == "torch" else [1, 2, 3, 4])
    assert "final/mIoU_ms_flip" in run.data.metrics
    # Rank 0 measured the attention at each validation; the driver drew them from the last checkpoint.
    shares = client.get_metric_history(report.run_id, "attention/head/share")
    assert sorted(m.step for m in shares) == ([4, 7] if loader == "torch" else [4])
    plots = {a.path for a in client.list_artifacts(report.run_id, "plots")}
    assert "plots/attention_diagnostics.png" in plots
    artifacts = {a.path for a in client.list_artifacts(report.run_id, "checkpoints/best")}
    assert artifacts == {"checkpoints/best/checkpoint.pt"}
    assert {a.path for a in client.list_artifacts(report.run_id, "evaluation")} == {"evaluation/results.md"}
    files = storage.list_files(config.run.storage)
    ray_checkpoints = [name for name in files if name.endswith("checkpoint.pt")]
    assert "two-workers/best/checkpoint.pt" in ray_checkpoints
    assert len(ray_checkpoints) >= 2  # Ray's periodic checkpoints on S3 next to the best one
