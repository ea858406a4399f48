"""What a training is built from its config, detectron2-style: ``build_*`` functions that read the config so
that the loop (:func:`pipeline.train.loop.run_loop`) receives built objects and never the whole config.

:func:`build_training` makes a :class:`Training`: the model (seeded, restored from the session's checkpoint
when the run resumes, distributed over the workers), the optimiser, the gradient scaler, the loss, the stream
of training batches (from the shards, or from the worker's Ray Data shard) and the validation set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ccnet.losses import SegmentationLoss
from pipeline.config import Config
from pipeline.config.model import build_model, input_normalization
from pipeline.data.readers import ShardDataset
from pipeline.data.sampling import ShardBatchSampler
from pipeline.data.schema import Manifest
from pipeline.data.transforms import JointTransform, build_eval_transform, build_train_transform
from pipeline.io.checkpoints import load_model_state
from pipeline.train.identity import check_continuation, run_identity
from pipeline.train.sessions import Session, restore_rng
from pipeline.train.spec import RunSpec

log = logging.getLogger(__name__)

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Training:
    """Everything the loop trains with, built by :func:`build_training`.

    Attributes:
        model: the model as saved and evaluated; ``trained`` is what the steps run (distributed, compiled).
        batches: (images, labels) on the device, from the iteration the run starts at to its last.
        start: the iteration the run starts at (a resumed run: its checkpoint's).
        best_miou: the best val mIoU so far (a resumed run: its checkpoint's).
        meta: what every checkpoint carries beside the training state (model name, classes, config, input
            normalisation, tracking run id).
        attention_history: ``(iteration, attention diagnostics)`` at each validation so far, rank 0's
            (:func:`ccnet.diagnostics.attention_diagnostics`; a resumed run: its checkpoint's, then its own).
        seconds: the seconds trained so far (a resumed run: its earlier starts' up to its checkpoint; the
            loop adds its own), so that a run trained in pieces reports what it cost uninterrupted.
    """

    model: nn.Module
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: SegmentationLoss
    batches: Batches
    val_data: ShardDataset
    num_classes: int
    ignore_index: int
    start: int = 0
    best_miou: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    attention_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0

    def state(self, iteration: int, rng: list[torch.Tensor], val_result: dict | None) -> dict[str, Any]:
        """The resumable state at ``iteration``; ``rng``: every rank's random state, rank 0's first;
        ``val_result``: the validation of this iteration, if it ran (the final results reuse the best's)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": iteration,
            "best_miou": self.best_miou,
            "rng": rng[0],
            "rng_per_rank": rng,
            **self.meta,
            "val_result": val_result,
            "attention_history": self.attention_history,
            "train_seconds": self.seconds,
        }


def build_loss(
    config: Config, ignore_index: int, class_weights: Sequence[float] | None = None
) -> SegmentationLoss:
    """The training loss of ``config.train``: main + aux, OHEM and the category-consistent loss as set,
    weighted per class by ``class_weights`` (a run spec's, counted on the train split) when given."""
    train_cfg = config.train
    weight = train_cfg.consistency_weight
    return SegmentationLoss(
        aux_weight=train_cfg.aux_weight,
        ignore_index=ignore_index,
        ohem=train_cfg.ohem,
        ohem_thresh=train_cfg.ohem_thresh,
        ohem_min_kept=train_cfg.ohem_min_kept,
        consistency=weight > 0,
        consistency_weights=(weight, weight, 0.001 * weight),
        class_weights=class_weights,
    )


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
            sampler.shard_sizes,
            sampler.batch_size,
            rank=sampler.rank,
            world_size=sampler.world_size,
            seed=sampler.seed,
            start_iteration=iteration,
            end_iteration=epoch_end,
        )
        # Its own generator: a DataLoader draws a seed when iterated, which would shift the global RNG
        # (dropout) differently in a resumed run that starts mid-epoch.
        generator = torch.Generator().manual_seed(sampler.seed + epoch)
        loader = torch.utils.data.DataLoader(  # pinned host memory: the copies overlap the GPU's work
            dataset,
            batch_sampler=part,
            num_workers=loader_workers,
            generator=generator,
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


def _distribute(model: nn.Module, session: Session, sync_bn: bool) -> nn.Module:
    if session.world_size == 1:
        return model
    if sync_bn and session.device.type == "cuda":  # SyncBatchNorm needs NCCL; on CPU/gloo it fails
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [session.device.index] if session.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def parameter_groups(
    model: nn.Module,
    *,
    head_lr_mult: float = 1.0,
    weight_decay: float = 0.0,
    no_decay_1d: bool = False,
    stem_lr_mult: float | None = None,
) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the backbone's and the rest's (head, aux head, stem attention), each
    split into decayed and undecayed parameters when ``no_decay_1d``; empty groups are left out.

    Every trainable parameter lands in exactly one group (a parameter in none would silently never train:
    DANet#84). Each group carries ``name`` (``backbone``, ``head``, ``backbone_no_decay``, ``head_no_decay``;
    ``stem`` and ``stem_no_decay`` with ``stem_lr_mult``) and ``lr_mult`` (1 for the backbone,
    ``head_lr_mult`` for the rest), which the poly schedule multiplies its learning rate by at every
    iteration.

    Args:
        model: the model as built (not wrapped by DistributedDataParallel), with a ``backbone`` submodule.
        head_lr_mult: learning-rate multiple for every parameter outside ``model.backbone``.
        weight_decay: the decay of the decayed groups.
        no_decay_1d: keep 1-D parameters (biases, norm weights, ``gamma``) out of weight decay.
        stem_lr_mult: when given, the attention before the backbone (``model.stem_attention``) goes in
            groups of its own at this multiple instead of the head's.
    """
    backbone = {id(p) for p in model.backbone.parameters()}  # type: ignore[union-attr]
    stem_attention = getattr(model, "stem_attention", None)
    stem = (
        {id(p) for p in stem_attention.parameters()} if stem_lr_mult is not None and stem_attention else set()
    )
    multiple = {"backbone": 1.0, "stem": stem_lr_mult, "head": head_lr_mult}
    groups: dict[str, dict[str, Any]] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        part = "backbone" if id(parameter) in backbone else "stem" if id(parameter) in stem else "head"
        undecayed = no_decay_1d and parameter.ndim <= 1
        name = f"{part}_no_decay" if undecayed else part
        group = groups.setdefault(
            name,
            {
                "name": name,
                "params": [],
                "lr_mult": multiple[part],
                "weight_decay": 0.0 if undecayed else weight_decay,
            },
        )
        group["params"].append(parameter)
    order = ("backbone", "backbone_no_decay", "stem", "stem_no_decay", "head", "head_no_decay")
    return [groups[name] for name in order if name in groups]


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay over :func:`parameter_groups` (the poly schedule sets each group's
    learning rate, ``lr * lr_mult``, every iteration)."""
    train = config.train
    groups = parameter_groups(
        model,
        head_lr_mult=train.head_lr_mult,
        weight_decay=train.weight_decay,
        no_decay_1d=train.no_decay_1d,
        stem_lr_mult=train.stem_lr_mult,
    )
    for group in groups:
        group["lr"] = train.lr * group["lr_mult"]
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def train_transform(config: Config, manifest: Manifest) -> JointTransform:
    """The training augmentation (random scale, crop, flip) and normalisation, crop padding labelled with the
    manifest's ``ignore_index``: one recipe for the shards' loader and for Ray Data."""
    data = config.data
    normalization = input_normalization(config)
    return build_train_transform(
        data.crop_size,
        (data.scale_min, data.scale_max),
        ignore_index=manifest.ignore_index,
        mean=normalization.mean,
        std=normalization.std,
    )


def build_train_batches(spec: RunSpec, session: Session, start: int) -> Batches:
    """The training batches from iteration ``start``: from this worker's Ray Data shard when Ray Data feeds
    it (``data.loader: ray``), else read from the shards with the training augmentation, each worker its
    part of every epoch (:class:`ShardBatchSampler`)."""
    data, train = spec.config.data, spec.config.train
    shard = getattr(session, "train_shard", None)
    if shard is not None:
        return _ray_batches(shard, data.batch_size, start, train.iterations, session.device)
    dataset = ShardDataset(
        data.uri,
        data.train_split,
        seed=train.seed,
        transform=train_transform(spec.config, spec.manifest),
        manifest=spec.manifest,
    )
    sampler = ShardBatchSampler(
        [shard.rows for shard in dataset.shards],
        data.batch_size,
        rank=session.rank,
        world_size=session.world_size,
        seed=train.seed,
        start_iteration=start,
        end_iteration=train.iterations,
    )
    return _batches(dataset, sampler, data.loader_workers, session.device)


def build_training(spec: RunSpec, session: Session, run_id: str | None = None) -> Training:
    """The model, optimiser, scaler, loss, batches and validation set of ``spec`` in this worker, restored
    from the session's checkpoint when the run resumes. The random draws happen in the same order on every
    run (the same seed: the same initial weights on every worker), which a bit-equal resume relies on."""
    config, manifest = spec.config, spec.manifest
    train = config.train
    torch.manual_seed(train.seed)  # the same initial weights on every worker
    model = build_model(config, manifest.num_classes).to(session.device)
    optimizer = build_optimizer(config, model)
    scaler = torch.amp.GradScaler(session.device.type, enabled=train.amp == "O1")
    loss_fn = build_loss(config, manifest.ignore_index, spec.class_weights).to(session.device)
    start, best_miou, attention_history, seconds = 0, None, [], 0.0
    state = session.restore()
    identity = run_identity(config, manifest)
    if state is not None:
        if "identity" in state:  # a search's trial resumes here without the driver's check (context.py)
            check_continuation(state["identity"], config, manifest, f"run {spec.name!r}")
        load_model_state(model, state, f"checkpoint of iteration {state['iteration']}")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, best_miou = state["iteration"], state.get("best_miou")
        attention_history = state.get("attention_history", [])
        seconds = float(state.get("train_seconds", 0.0))  # 0: a checkpoint older than the count
        restore_rng(state, session, train.seed)
        log.info("resumed from iteration %d", start)
    else:
        torch.manual_seed(train.seed * 1000 + session.rank + 1)  # dropout differs across workers
    trained = _distribute(model, session, config.model.sync_bn)
    if train.compile:
        trained = cast(nn.Module, torch.compile(trained))  # a compiled module is called as the module
    normalization = input_normalization(config)
    val_data = ShardDataset(
        config.data.uri,
        config.data.val_split,
        manifest=manifest,
        transform=build_eval_transform(normalization.mean, normalization.std),
    )
    meta = {
        "tracking_run_id": run_id,
        "model_name": config.model.name,
        "num_classes": manifest.num_classes,
        "config": config.to_dict(),
        "normalization": normalization.as_dict(),
        "identity": identity,
    }
    return Training(
        model,
        trained,
        optimizer,
        scaler,
        loss_fn,
        build_train_batches(spec, session, start),
        val_data,
        manifest.num_classes,
        manifest.ignore_index,
        start,
        best_miou,
        meta,
        attention_history,
        seconds,
    )
