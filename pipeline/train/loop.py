"""The training loop: plain PyTorch, the same in one process and in every Ray Train worker.

    summary = train_loop(config, LocalSession(run_uri), run_id=None)     # no Ray
    # Ray: pipeline.train.ray_train runs train_loop(config, RaySession(), run_id) in each worker

Recipe (the paper's): SGD with momentum and weight decay, poly learning rate ``lr * (1 - it / max_it)^power``
set every iteration, main + 0.4 x aux cross-entropy (OHEM and the category-consistent loss optional),
iteration-based, seeded. Mixed precision levels (apex names): O0 float32; O1 float16 autocast with a
GradScaler; O2 bfloat16 autocast (no scaler: bf16 has float32's range). A non-finite loss skips the step;
``max_nonfinite`` in a row stop the run.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ccnet import build_ccnet, model_config
from ccnet.backbones import Normalization, backbone_normalization
from ccnet.losses import SegmentationLoss
from pipeline.config import Config
from pipeline.data.readers import ShardDataset, open_manifest
from pipeline.data.sampling import ShardBatchSampler
from pipeline.data.transforms import build_eval_transform, build_train_transform
from pipeline.io import storage
from pipeline.io.checkpoints import CheckpointStore, load, load_model_state
from pipeline.tracking.base import NullTracker, Tracker

log = logging.getLogger(__name__)

AMP_DTYPES: dict[str, torch.dtype | None] = {"O0": None, "O1": torch.float16, "O2": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite for too many iterations in a row."""


class Session(Protocol):
    """Where the loop runs: its rank, device, how checkpoints are stored and restored."""

    rank: int
    world_size: int
    device: torch.device

    def restore(self) -> dict[str, Any] | None: ...
    def checkpoint(self, state: dict[str, Any] | None, iteration: int, metrics: dict[str, float]) -> None: ...


@dataclass
class LocalSession:
    """One process, no Ray: checkpoints in ``<run_uri>/checkpoints``, the last ``keep`` kept."""

    run_uri: str
    keep: int = 2
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def restore(self) -> dict[str, Any] | None:
        latest = CheckpointStore(self.run_uri).latest()
        return load(latest) if latest else None

    def checkpoint(self, state: dict[str, Any] | None, iteration: int, metrics: dict[str, float]) -> None:
        if state is not None:
            store = CheckpointStore(self.run_uri)
            store.save(state, iteration)
            store.prune(self.keep)


@dataclass
class TrainSummary:
    iterations: int
    final_loss: float
    best_miou: float | None
    val_miou: float | None
    images_per_second: float
    skipped_steps: int


def peak_memory_mib(device: torch.device) -> float:
    """The most memory this process has held: the CUDA allocator's peak on a GPU, else the peak resident set
    size of the process (a Ray Train worker is a process of its own), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float) -> float:
    """``base_lr * (1 - iteration / max_iterations) ** power``."""
    return base_lr * (1 - iteration / max_iterations) ** power


def build_model(config: Config, num_classes: int, *, pretrained: bool = True) -> nn.Module:
    """The configured model; ``pretrained=False`` skips the backbone's ImageNet weights (a checkpoint is
    about to replace every weight, so evaluation and prediction need neither the file nor its package)."""
    overrides = config.model.overrides()
    if not pretrained:
        overrides.pop("pretrained", None)
    return build_ccnet(config.model.name, num_classes, **overrides)


def input_normalization(config: Config) -> Normalization:
    """The ``(image - mean) / std`` that the configured model's backbone weights expect (the backbone's
    description owns it): training transforms, evaluation, prediction and checkpoints all use this."""
    return backbone_normalization(model_config(config.model.name, **config.model.overrides()).backbone)


# Backbones that train from scratch by design; every other one is started from ImageNet by its recipes.
_FROM_SCRATCH_BACKBONES = ("tiny",)


def warn_if_not_pretrained(config: Config) -> bool:
    """Log one WARNING when ``config`` trains a backbone without the ImageNet weights its recipe expects.

    That is ``model.pretrained`` left null for any backbone but the tiny one; ``pretrained: none`` says no
    weights on purpose and stays silent. Call it once, on the driver.

    Returns:
        Whether it warned.
    """
    if config.model.pretrained is not None:
        return False
    backbone = model_config(config.model.name).backbone
    if backbone in _FROM_SCRATCH_BACKBONES:
        return False
    log.warning(
        "model.pretrained is null: %s (backbone %s) trains from random weights, far from the paper's "
        "accuracy; set model.pretrained to ImageNet weights, or to none to train from scratch on purpose",
        config.model.name, backbone,
    )
    return True


def build_loss(config: Config, ignore_index: int) -> SegmentationLoss:
    """The training loss of ``config.train``: main + aux, OHEM and the category-consistent loss as set."""
    train_cfg = config.train
    weight = train_cfg.consistency_weight
    return SegmentationLoss(
        aux_weight=train_cfg.aux_weight, ignore_index=ignore_index, ohem=train_cfg.ohem,
        ohem_thresh=train_cfg.ohem_thresh, ohem_min_kept=train_cfg.ohem_min_kept,
        consistency=weight > 0, consistency_weights=(weight, weight, 0.001 * weight),
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or torch.compile), for saving and evaluation."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


@dataclass
class Step:
    """One optimisation step's components, from :func:`train_step`."""

    loss: float
    parts: dict[str, float]
    finite: bool


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: SegmentationLoss,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
) -> Step:
    """Forward, loss, backward, update. A non-finite loss skips the update (and returns finite=False)."""
    optimizer.zero_grad(set_to_none=True)
    device_type = images.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        outputs = model(images)
    # The loss in float32: cross-entropy over many pixels loses precision in half types.
    losses = loss_fn({key: value.float() for key, value in outputs.items()}, labels)
    loss = losses["loss"]
    parts = {name: float(value.detach()) for name, value in losses.items() if name != "loss"}
    if not torch.isfinite(loss):
        return Step(float(loss.detach()), parts, finite=False)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # with O1, skipped by the scaler when gradients overflowed
    scaler.update()
    return Step(float(loss.detach()), parts, finite=True)


def _batches(
    dataset: ShardDataset, sampler: ShardBatchSampler, loader_workers: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from ``sampler``'s iterations, one DataLoader per epoch (so augmentation sees the epoch)."""
    iteration = sampler.start_iteration
    while iteration < sampler.end_iteration:
        epoch = sampler.epoch_of(iteration)
        epoch_end = min((epoch + 1) * sampler.batches_per_epoch, sampler.end_iteration)
        dataset.set_epoch(epoch)
        part = ShardBatchSampler(
            sampler.shard_sizes, sampler.batch_size, rank=sampler.rank, world_size=sampler.world_size,
            seed=sampler.seed, start_iteration=iteration, end_iteration=epoch_end,
        )
        # Its own generator: a DataLoader draws a seed when iterated, which would shift the global RNG
        # (dropout) differently in a resumed run that starts mid-epoch.
        generator = torch.Generator().manual_seed(sampler.seed + epoch)
        loader = torch.utils.data.DataLoader(  # pinned host memory: the copies overlap the GPU's work
            dataset, batch_sampler=part, num_workers=loader_workers, generator=generator,
            pin_memory=device.type == "cuda",
        )
        for batch in loader:
            yield batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        iteration = epoch_end


def _ray_batches(
    shard: Any, batch_size: int, start: int, end: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches streamed from this worker's Ray Data shard, pass after pass, for iterations start..end.

    A resumed run starts a new pass rather than mid-pass: Ray Data streams without a fixed order.
    """
    iteration = start
    while iteration < end:
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True):
            yield batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            iteration += 1
            if iteration >= end:
                return


def _rng_states(session: Session) -> list[torch.Tensor]:
    """Every rank's torch RNG state, rank 0 first (gathered: a collective that every rank calls)."""
    state = torch.get_rng_state()
    if session.world_size == 1 or not torch.distributed.is_initialized():
        return [state]
    states: list[Any] = [None] * session.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def _restore_rng(state: dict[str, Any], session: Session, seed: int) -> None:
    """Each rank continues its own random stream (dropout, augmentation) from the checkpoint, so that a
    resumed run is bit-equal to an uninterrupted one. With another number of workers than the checkpoint's
    (or a checkpoint from before per-rank states), rank 0 continues the saved stream and the others start
    fresh ones: the run resumes correctly, but not bit-equal."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) == session.world_size:
        torch.set_rng_state(per_rank[session.rank])
        return
    if session.rank == 0:
        log.info("resuming %d workers from a checkpoint of %d: the random streams of ranks 1+ start afresh "
                 "(a correct resume, not a bit-equal one)", session.world_size, len(per_rank))
        torch.set_rng_state(per_rank[0])
    else:
        torch.manual_seed(seed * 1000 + session.rank + 1 + state["iteration"] * 7919)


def _distribute(model: nn.Module, session: Session, sync_bn: bool) -> nn.Module:
    if session.world_size == 1:
        return model
    if sync_bn and session.device.type == "cuda":  # SyncBatchNorm needs NCCL; on CPU/gloo it fails
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [session.device.index] if session.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def train_loop(
    config: Config, session: Session, run_id: str | None = None, tracker: Tracker | None = None
) -> TrainSummary:
    """Train (or resume) ``config`` in this worker; returns a summary. Rank 0 logs to ``tracker``."""
    from pipeline.eval.evaluation import EvalResult, evaluate

    tracker = NullTracker() if tracker is None else tracker
    train_cfg, data_cfg = config.train, config.data
    amp_dtype = AMP_DTYPES[train_cfg.amp]
    manifest = open_manifest(data_cfg.uri)
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every worker
    model = build_model(config, manifest.num_classes).to(session.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay
    )
    scaler = torch.amp.GradScaler(session.device.type, enabled=train_cfg.amp == "O1")
    loss_fn = build_loss(config, manifest.ignore_index)
    start, best_miou = 0, None
    state = session.restore()
    if state is not None:
        load_model_state(model, state, f"checkpoint of iteration {state['iteration']}")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, best_miou = state["iteration"], state.get("best_miou")
        _restore_rng(state, session, train_cfg.seed)
        log.info("resumed from iteration %d", start)
    else:
        torch.manual_seed(train_cfg.seed * 1000 + session.rank + 1)  # dropout differs across workers
    trained = _distribute(model, session, config.model.sync_bn)
    if train_cfg.compile:
        trained = torch.compile(trained)

    normalization = unwrap(model).normalization
    train_data = ShardDataset(
        data_cfg.uri, data_cfg.train_split, seed=train_cfg.seed,
        transform=build_train_transform(
            data_cfg.crop_size, (data_cfg.scale_min, data_cfg.scale_max), ignore_index=manifest.ignore_index,
            mean=normalization.mean, std=normalization.std,
        ),
    )
    val_data = ShardDataset(
        data_cfg.uri, data_cfg.val_split,
        transform=build_eval_transform(normalization.mean, normalization.std),
    )
    sampler = ShardBatchSampler(
        [shard.rows for shard in train_data.shards], data_cfg.batch_size, rank=session.rank,
        world_size=session.world_size, seed=train_cfg.seed, start_iteration=start,
        end_iteration=train_cfg.iterations,
    )

    def state_dict(iteration: int, rng: list[torch.Tensor]) -> dict[str, Any]:
        """The resumable state; ``rng``: every rank's random state (:func:`_rng_states`), rank 0's first."""
        return {
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "iteration": iteration, "best_miou": best_miou,
            "rng": rng[0], "rng_per_rank": rng, "mlflow_run_id": run_id, "model_name": config.model.name,
            "num_classes": manifest.num_classes, "config": config.to_dict(),
            "normalization": normalization.as_dict(),
            "val_result": validated[1].state() if validated and validated[0] == iteration else None,
        }

    # This iteration's validation goes into its checkpoints (the final results reuse the best one's).
    validated: tuple[int, EvalResult] | None = None

    def validate() -> dict[str, float]:
        nonlocal validated
        result = evaluate(
            unwrap(model), val_data, num_classes=manifest.num_classes, ignore_index=manifest.ignore_index,
            mode=config.eval.mode, crop_size=config.eval.crop_size, stride=config.eval.stride,
            fusion=config.eval.fusion, max_images=config.eval.max_images, device=session.device,
            rank=session.rank, world_size=session.world_size, progress=False, amp_dtype=amp_dtype,
        )
        validated = (iteration, result)
        model.train()
        # mIoU, pixel accuracy and per-class IoU; classes absent from the images (NaN) are left out
        return {name: value for name, value in result.as_metrics("val").items() if not math.isnan(value)}

    model.train()
    nonfinite = skipped = 0
    loss_value, val_miou, images_per_second = float("nan"), None, 0.0
    window_start, window_images = time.perf_counter(), 0
    window_rates: list[float] = []  # images/s of each logged window, for the run's median
    iteration = start
    shard = getattr(session, "train_shard", None)
    batches = (
        _ray_batches(shard, data_cfg.batch_size, start, train_cfg.iterations, session.device)
        if shard is not None
        else _batches(train_data, sampler, data_cfg.loader_workers, session.device)
    )
    for images, labels in batches:
        lr = poly_lr(train_cfg.lr, iteration, train_cfg.iterations, train_cfg.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step = train_step(trained, images, labels, loss_fn, optimizer, scaler, amp_dtype)
        iteration += 1
        window_images += images.shape[0] * session.world_size
        if not step.finite:
            nonfinite, skipped = nonfinite + 1, skipped + 1
            log.warning("iteration %d: non-finite loss %s, step skipped", iteration, step.loss)
            if nonfinite >= train_cfg.max_nonfinite:
                raise NonFiniteLossError(
                    f"loss was non-finite for {nonfinite} iterations in a row (last at {iteration}); "
                    "lower train.lr or use train.amp=O0/O2"
                )
            continue
        nonfinite, loss_value = 0, step.loss
        metrics: dict[str, float] = {}
        if iteration % train_cfg.log_every == 0 or iteration == train_cfg.iterations:
            elapsed = time.perf_counter() - window_start
            images_per_second = window_images / max(elapsed, 1e-9)
            window_rates.append(images_per_second)
            metrics = {"train/loss": step.loss, "train/lr": lr, "train/images_per_second": images_per_second}
            metrics.update({f"train/loss_{name}": value for name, value in step.parts.items()})
            window_start, window_images = time.perf_counter(), 0
            if session.rank == 0:
                log.info("iteration %d/%d loss %.4f lr %.5f %.1f img/s", iteration, train_cfg.iterations,
                         step.loss, lr, images_per_second)
        if iteration % train_cfg.eval_every == 0 or iteration == train_cfg.iterations:
            metrics.update(validate())
            val_miou = metrics.get("val/mIoU")  # absent when no validation pixel is labelled
            if val_miou is not None and (best_miou is None or val_miou > best_miou):
                best_miou = val_miou
                rng = _rng_states(session)  # every rank takes this branch: val mIoU is the global one
                if session.rank == 0:
                    CheckpointStore(run_uri(config)).save_best(state_dict(iteration, rng))
        if iteration == train_cfg.iterations:  # what the run cost, for ablation tables
            metrics["train/median_images_per_second"] = statistics.median(window_rates)
            metrics["train/peak_memory_mib"] = peak_memory_mib(session.device)
        if session.rank == 0 and metrics:
            tracker.log_metrics(metrics, step=iteration)
        if iteration % train_cfg.checkpoint_every == 0 or iteration == train_cfg.iterations:
            rng = _rng_states(session)  # every rank's: a resumed run draws what this one would have
            state = state_dict(iteration, rng) if session.rank == 0 else None
            # The latest val mIoU goes with every report: a search's scheduler reads it at each one.
            latest = {"val/mIoU": val_miou} if val_miou is not None else {}
            session.checkpoint(state, iteration, {"iteration": iteration, **latest, **metrics})
    return TrainSummary(iteration, loss_value, best_miou, val_miou, images_per_second, skipped)


def run_uri(config: Config) -> str:
    """Where a run keeps its checkpoints: ``<run.storage>/<run.name>``."""
    return storage.join(config.run.storage, config.run.name)
