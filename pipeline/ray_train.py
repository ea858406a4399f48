"""Ray Train V2: run :func:`pipeline.train.train_loop` in every worker of a ``TorchTrainer``.

Ray places the workers (CPU with gloo, or one GPU each with NCCL), stores the periodic checkpoints under
``<run.storage>/<run.name>`` (local folder or S3 through the storage module's filesystem), restarts
failed workers from the last checkpoint (``FailureConfig(max_failures)``), and resumes a run started
again with the same name. The loop itself is ours and is the same as without Ray.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import storage
from pipeline.checkpoints import CHECKPOINT_FILE, load, save_file
from pipeline.config import Config, config_from_dict
from pipeline.resources import WorkerRequest, ensure_placeable

log = logging.getLogger(__name__)


@dataclass
class RaySession:
    """The loop's view of a Ray Train worker."""

    rank: int
    world_size: int
    device: torch.device
    train_shard: Any = None  # this worker's Ray Data shard when data.loader is "ray"

    def restore(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load(str(Path(folder) / CHECKPOINT_FILE))

    def checkpoint(self, state: dict[str, Any] | None, iteration: int, metrics: dict[str, float]) -> None:
        import ray.train

        # report() is a collective: every rank calls it, only rank 0 attaches the checkpoint.
        with tempfile.TemporaryDirectory() as folder:
            attached = None
            if state is not None:
                save_file(folder, state)
                attached = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=attached)


def _worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from pipeline.tracking import Tracker
    from pipeline.train import train_loop

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    session = RaySession(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    if config.data.loader == "ray":
        session.train_shard = ray.train.get_dataset_shard("train")
    tracker = None
    if session.rank == 0 and loop_config["run_id"]:
        tracker = Tracker(loop_config["tracking_uri"], config.tracking.experiment, required=False,
                          settle_timeout=config.tracking.settle_timeout)
        tracker.start(config.run.name, run_id=loop_config["run_id"])
    try:
        summary = train_loop(config, session, loop_config["run_id"], tracker)
    finally:
        if tracker is not None:
            tracker.settle()  # what an outage held back; the driver ends the run after its final evaluation
    log.info("worker %d finished: %s", session.rank, summary)


def train_datasets(config: Config) -> dict[str, Any]:
    """The Ray Datasets the trainer shards over its workers: ``{"train": ...}`` when ``data.loader`` is
    "ray", else none. The augmentation is the plain-PyTorch path's, crop padding labelled with the
    manifest's ``ignore_index``."""
    if config.data.loader != "ray":
        return {}
    from pipeline.data.readers import open_manifest, ray_dataset
    from pipeline.data.transforms import build_train_transform
    from pipeline.train import input_normalization

    data = config.data
    manifest = open_manifest(data.uri)
    normalization = input_normalization(config)
    transform = build_train_transform(
        data.crop_size, (data.scale_min, data.scale_max), ignore_index=manifest.ignore_index,
        mean=normalization.mean, std=normalization.std,
    )
    dataset = ray_dataset(
        data.uri, data.train_split, transform=transform, seed=config.train.seed, epoch=None,
        batch_size=data.batch_size,
    )
    return {"train": dataset.select_columns(["image", "label"])}  # tensors only: sample ids are strings


def worker_request(config: Config, driver_cpus: float = 0.0) -> WorkerRequest:
    """What the run's worker group asks Ray for (``driver_cpus``: a search trial's own process)."""
    run = config.run
    return WorkerRequest(run.num_workers, run.cpus_per_worker, 1.0 if run.use_gpu else 0.0, driver_cpus)


def connect(config: Config, driver_cpus: float = 0.0) -> None:
    """Start (or join) Ray and check that the run's workers fit the cluster: call it before anything is
    written, so a request that cannot be placed is refused with both numbers instead of waiting forever."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(include_dashboard=False, log_to_driver=True)
    ensure_placeable(worker_request(config, driver_cpus), wait=config.run.resource_wait)


def fit(config: Config, run_id: str | None, tracking_uri: str | None, callbacks: list | None = None) -> Any:
    """Run the training with Ray Train; returns Ray's ``Result`` (its ``checkpoint`` is the last one).

    ``callbacks`` go to the trainer's RunConfig (a search passes Tune's ``TuneReportCallback``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    connect(config)
    filesystem, path = storage.filesystem(config.run.storage)
    if storage.is_s3(config.run.storage):
        storage.ensure_bucket(config.run.storage)
    else:
        Path(path).mkdir(parents=True, exist_ok=True)
    datasets = train_datasets(config)
    trainer = TorchTrainer(
        _worker,
        datasets=datasets or None,
        train_loop_config={"config": config.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri},
        scaling_config=ScalingConfig(
            num_workers=config.run.num_workers,
            use_gpu=config.run.use_gpu,
            resources_per_worker={"CPU": config.run.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=path,
            storage_filesystem=filesystem if storage.is_s3(config.run.storage) else None,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
