"""Ray Train V2: run :func:`pipeline.train.loop.train_loop` in every worker of a ``TorchTrainer``.

Ray places the workers (CPU with gloo, or one GPU each with NCCL), stores the periodic checkpoints under
``<run.storage>/<run.name>`` (local folder or S3 through the storage module's filesystem), restarts
failed workers from the last checkpoint (``FailureConfig(max_failures)``), and resumes a run started
again with the same name. The loop itself is ours and is the same as without Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.data.readers import ray_dataset
from pipeline.io import storage
from pipeline.io.checkpoints import CHECKPOINT_FILE, CheckpointError, load
from pipeline.io.errors import user_message
from pipeline.tracking import NullTracker, Tracker
from pipeline.train.build import train_transform
from pipeline.train.context import start_tracker
from pipeline.train.loop import train_loop
from pipeline.train.resources import DEBUG_ENV, connect, ray_log_level
from pipeline.train.sessions import RaySession
from pipeline.train.spec import RunSpec

log = logging.getLogger(__name__)

_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it registered


def _worker(loop_config: dict[str, Any]) -> None:
    project_logging()
    spec: RunSpec = loop_config["spec"]
    config = spec.config
    # Ray sets OMP_NUM_THREADS to the floor of the worker's CPUs: a trial's worker of 1.9 CPUs (the 0.1 left
    # is its driver's, which only waits) would compute on one thread of two.
    torch.set_num_threads(max(1, math.ceil(config.run.cpus_per_worker)))
    context = ray.train.get_context()
    session = RaySession(
        context.get_world_rank(),
        context.get_world_size(),
        ray.train.torch.get_device(),
        resume_from=loop_config.get("resume_from"),
        run_uri=spec.run_uri,
    )
    if config.data.loader == "ray":
        session.train_shard = ray.train.get_dataset_shard("train")
    tracker: Tracker = NullTracker()
    if session.rank == 0 and loop_config["run_id"]:  # the driver's run, continued; the driver ends it
        tracker = start_tracker(
            config, spec.tracking_uri, spec.name, run_id=loop_config["run_id"], required=False, announce=False
        )
    try:
        summary = train_loop(spec, session, loop_config["run_id"], tracker)
    finally:
        tracker.settle()  # what an outage held back; the driver ends the run after its final evaluation
    log.info("worker %d finished: %s", session.rank, summary)


def train_datasets(spec: RunSpec) -> dict[str, Any]:
    """The Ray Datasets the trainer shards over its workers: ``{"train": ...}`` when ``data.loader`` is
    "ray", else none. The augmentation is the plain-PyTorch path's, crop padding labelled with the
    manifest's ``ignore_index``."""
    config = spec.config
    if config.data.loader != "ray":
        return {}

    data = config.data
    dataset = ray_dataset(
        data.uri,
        data.train_split,
        transform=train_transform(config, spec.manifest),
        seed=config.train.seed,
        epoch=None,
        batch_size=data.batch_size,
        manifest=spec.manifest,
    )
    return {"train": dataset.select_columns(["image", "label"])}  # tensors only: sample ids are strings


def project_logging() -> None:
    """In a Ray worker or trial process: the project's own lines (``pipeline.*``, INFO and up) reach the
    driver's console, whatever level Ray's logging configuration gave the root logger there."""
    project = logging.getLogger("pipeline")
    if not any(getattr(handler, "_ccnet", False) for handler in project.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler._ccnet = True  # type: ignore[attr-defined]
        project.addHandler(handler)
    project.setLevel(logging.INFO)
    project.propagate = False
    # Ray Train's worker-side notices ("Reporting training result ...") go through the root logger.
    logging.getLogger().setLevel(logging.DEBUG if os.environ.get(DEBUG_ENV) else logging.WARNING)


@dataclass
class Unregistered:
    """Checkpoint folders of a Ray run that Ray's checkpoint manager does not list: written by a worker,
    then the run stopped (Ctrl-C, a killed driver) before the controller registered them."""

    folders: list[str]  # names under the run folder
    newest: str | None  # the checkpoint file to resume from: newer than every registered one and loadable


def unregistered_checkpoints(run_folder: str) -> Unregistered:
    """Finds the ``checkpoint_*`` folders of ``run_folder`` missing from Ray's
    ``checkpoint_manager_snapshot.json``, and the newest one that loads and is ahead of Ray's latest."""

    names = storage.list_files(run_folder)
    folders = sorted({name.split("/")[0] for name in names if name.startswith("checkpoint_") and "/" in name})
    registered, latest = set(), -1
    if _SNAPSHOT in names:
        snapshot = json.loads(storage.read_bytes(storage.join(run_folder, _SNAPSHOT)))
        for result in snapshot.get("checkpoint_results", []):
            registered.add(result["checkpoint_dir_name"])
            latest = max(latest, int(result.get("metrics", {}).get("iteration", -1)))
    orphans = [folder for folder in folders if folder not in registered]
    newest, newest_iteration = None, latest
    for folder in orphans:
        uri = storage.join(run_folder, folder, CHECKPOINT_FILE)
        try:
            iteration = load(uri)["iteration"]
        except (CheckpointError, FileNotFoundError):
            continue  # cut short while it was written: not a state to resume from
        if iteration > newest_iteration:
            newest, newest_iteration = uri, iteration
    return Unregistered(orphans, newest)


def ray_storage(run_storage: str) -> tuple[Any, str]:
    """What Ray Train and Tune get as ``storage_filesystem`` and ``storage_path`` for ``run.storage``: S3's
    filesystem (its bucket created when missing), or None and a local folder (created)."""
    filesystem, path = storage.filesystem(run_storage)
    if storage.is_s3(run_storage):
        storage.ensure_bucket(run_storage)
        return filesystem, path
    Path(path).mkdir(parents=True, exist_ok=True)
    return None, path


def fit(spec: RunSpec, run_id: str | None, callbacks: list | None = None) -> Any:
    """Run the training ``spec`` with Ray Train, continuing tracked run ``run_id`` in rank 0; returns Ray's
    ``Result`` (its ``checkpoint`` is the last one).

    ``callbacks`` go to the trainer's RunConfig (a search passes Tune's ``TuneReportCallback``).
    """
    config = spec.config
    if not ray.is_initialized():  # a training's open_run connected already, and a search's trial runs in Ray
        connect(config)
    filesystem, path = ray_storage(config.run.storage)
    datasets = train_datasets(spec)
    run_folder = spec.run_uri
    unregistered = unregistered_checkpoints(run_folder)
    trainer = TorchTrainer(
        _worker,
        datasets=datasets or None,
        train_loop_config={"spec": spec, "run_id": run_id, "resume_from": unregistered.newest},
        scaling_config=ScalingConfig(
            num_workers=config.run.num_workers,
            use_gpu=config.run.use_gpu,
            resources_per_worker={"CPU": config.run.cpus_per_worker},
        ),
        # Ray Train V2's RunConfig (what ray.train exports at run time) takes logging_config; the static
        # annotation is V1's.
        run_config=RunConfig(  # type: ignore[call-arg]
            name=spec.name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=ray_log_level()),  # the controller's notices
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as error:  # one line per failed rank, not Ray's traceback dump
        failures = "; ".join(
            f"rank {rank}: {user_message(failure)}" for rank, failure in sorted(error.worker_failures.items())
        )
        raise RuntimeError(f"training failed: {failures}") from None
    # The run went past every checkpoint Ray never registered, and Ray's own are the record now: those found
    # above, and those a worker wrote just before it was lost (Ray Train restarted the group from the last one
    # it had registered, without them).
    leftover = unregistered_checkpoints(run_folder).folders
    if leftover:
        for folder in leftover:
            storage.delete_tree(storage.join(run_folder, folder))
        log.info(
            "removed %d checkpoint folder(s) that Ray never registered: %s",
            len(leftover),
            ", ".join(leftover),
        )
    return result
