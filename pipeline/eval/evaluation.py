"""Validation: predict every image of a split, accumulate one confusion matrix, report IoU and accuracy.

:func:`evaluate` runs one protocol (whole image or sliding window, optionally multi-scale with flip) through
:mod:`ccnet.inference`; :func:`evaluate_protocols` runs the two that ``ccnet evaluate`` records (single-scale,
and the configured scales with flip) and :func:`protocol_table` renders them as markdown::

    model = build_ccnet("ccnet_tiny", num_classes=dataset.num_classes)
    protocol = EvalProtocol(mode="slide", crop_size=769, stride=513, scales=(0.75, 1.0, 1.25), flip=True)
    result = evaluate(model, dataset, protocol, num_classes=dataset.num_classes)
    result.miou, result.as_metrics("val")  # {"val/mIoU": ..., "val/IoU/road": ..., ...}

On several workers each rank predicts images ``rank::world_size`` and, when ``torch.distributed`` is
initialised, the confusion matrices are summed (``all_reduce``) so every rank returns the exact global result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from ccnet.inference import predict_multiscale
from ccnet.metrics import (
    SegmentationMetric,
)
from pipeline.config import EvalConfig
from pipeline.eval.results import MULTI_SCALE, SINGLE_SCALE, EvalResult, percent

log = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel: its forward may run collectives (buffer broadcast), which
    would hang when ranks predict different numbers of images or windows."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _check_device(model: nn.Module, device: torch.device) -> None:
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type != device.type:
        raise ValueError(f"model is on {parameter.device} but evaluate was asked to run on {device}")


def _shape_runs(items: list[Mapping[str, Any]]) -> Iterator[list[Mapping[str, Any]]]:
    """Consecutive items of equal image size: only those can share a batch."""
    run: list[Mapping[str, Any]] = []
    for item in items:
        if run and tuple(item["image"].shape) != tuple(run[0]["image"].shape):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _all_reduce_counts(confusion: Tensor, num_images: int) -> tuple[Tensor, int]:
    """Sum ``confusion`` and ``num_images`` over all ranks in one collective."""
    # gloo reduces CPU tensors, nccl CUDA tensors of the current device.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    num_classes = confusion.shape[0]
    counts = torch.cat([confusion.flatten(), torch.tensor([num_images])]).to(device)  # (K * K + 1,)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    counts = counts.cpu()
    return counts[:-1].view(num_classes, num_classes), int(counts[-1])  # (K * K,) -> (K, K)


class Samples(Protocol):
    """What evaluation reads: a sized, indexable set of ``{"image", "label"}`` items (a list, or a
    :class:`~pipeline.data.readers.ShardDataset`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class EvalProtocol:
    """How one evaluation predicts: whole image or sliding window, test-time scales and flip, and what the
    predictions average (see :mod:`ccnet.inference`).

    Attributes:
        mode: ``"whole"`` or ``"slide"`` (windows of ``crop_size`` every ``stride`` pixels).
        scales, flip: test-time resize factors and horizontal flip; ``(1.0,)`` without flip is single-scale.
        fusion: what windows, scales and flips average: ``"logits"`` (the authors') or ``"probs"``.
        max_images: only the first N images of the dataset (applied before the split over ranks).
    """

    mode: str = "whole"
    crop_size: int = 769
    stride: int = 513
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    fusion: str = "logits"
    max_images: int | None = None

    @classmethod
    def single_scale(cls, config: EvalConfig) -> EvalProtocol:
        """``config``'s mode and geometry at scale 1.0 without flip (validation during training)."""
        return cls(
            config.mode, config.crop_size, config.stride, (1.0,), False, config.fusion, config.max_images
        )

    @classmethod
    def multi_scale(cls, config: EvalConfig) -> EvalProtocol:
        """``config``'s mode and geometry with its scales and flip (the paper's multi-scale test)."""
        return cls(
            config.mode,
            config.crop_size,
            config.stride,
            tuple(config.scales),
            config.flip,
            config.fusion,
            config.max_images,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvalProtocol:
        """The protocol an exported file keeps (:func:`pipeline.eval.onnx.eval_protocol`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in values.items() if k in names}
        kwargs["scales"] = tuple(kwargs.get("scales", (1.0,)))
        return cls(**kwargs)

    def at_single_scale(self) -> EvalProtocol:
        """The same protocol at scale 1.0 without flip."""
        return dataclasses.replace(self, scales=(1.0,), flip=False)

    def describe(self) -> str:
        return f"eval {self.mode} x{len(self.scales)}{' +flip' if self.flip else ''}"


def _check_arguments(protocol: EvalProtocol, batch_size: int, rank: int, world_size: int) -> bool:
    """Refuses impossible arguments; returns whether the counts are summed over a process group."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if protocol.max_images is not None and protocol.max_images < 0:
        raise ValueError(f"max_images must be >= 0 or None, got {protocol.max_images}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    if distributed and (dist.get_world_size(), dist.get_rank()) != (world_size, rank):
        raise ValueError(
            f"rank {rank} of {world_size} does not match the process group's "
            f"rank {dist.get_rank()} of {dist.get_world_size()}"
        )
    return distributed


def _count(
    model: nn.Module,
    dataset: Samples,
    indices: range,
    protocol: EvalProtocol,
    metric: SegmentationMetric,
    batch_size: int,
    device: torch.device,
    bar: tqdm,
) -> None:
    """Predicts the images at ``indices`` in batches of consecutive images of one size, counting them."""
    for start in range(0, len(indices), batch_size):
        chunk = [dataset[i] for i in indices[start : start + batch_size]]
        for run in _shape_runs(chunk):
            images = torch.stack([torch.as_tensor(item["image"]) for item in run]).to(device)
            labels = torch.stack([torch.as_tensor(item["label"]) for item in run]).to(device)
            probs = predict_multiscale(
                model,
                images,
                scales=protocol.scales,
                flip=protocol.flip,
                mode=protocol.mode,
                crop_size=protocol.crop_size,
                stride=protocol.stride,
                num_classes=metric.num_classes,
                fusion=protocol.fusion,
            )  # (B, K, H, W)
            metric.update(probs.argmax(dim=1), labels.long())
        bar.update(len(chunk))


def evaluate(
    model: nn.Module,
    dataset: Samples,
    protocol: EvalProtocol | None = None,
    *,
    num_classes: int,
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Predict the dataset's images and count them against their labels.

    The model runs in eval mode under :func:`torch.inference_mode`; its previous mode is restored afterwards.
    A DistributedDataParallel model is evaluated through its ``module`` (no collectives per forward).

    Args:
        model: segmentation model (``model(image)["out"]`` is (B, K, h, w) logits), already on ``device``.
        dataset: indexable items ``{"image": (3, H, W) float normalised, "label": (H, W) int}``, e.g. a
            :class:`pipeline.data.readers.ShardDataset` with the eval transform. Sizes may differ per image.
        protocol: how to predict (default: whole image, single-scale, no flip).
        num_classes: K.
        ignore_index: label value that is not counted.
        class_names: K names; default the dataset's ``classes`` if it has them, else ``class_0``...
        device: where images are predicted and counted.
        batch_size: images per forward; only consecutive images of equal size are batched together.
        rank, world_size: this worker predicts images ``rank::world_size``. When ``torch.distributed`` is
            initialised and ``world_size > 1`` the counts are summed over all ranks, so every rank returns
            the global result; without it, each rank returns its own part (mergeable by summing).
        progress: show a progress bar (on rank 0 only).
        amp_dtype: run the forward under ``torch.autocast`` with this dtype (None: the model's own dtype).

    Returns:
        The confusion matrix over all counted pixels, with the protocol that produced it.
    """
    protocol = protocol or EvalProtocol()
    device = torch.device(device)
    distributed = _check_arguments(protocol, batch_size, rank, world_size)
    if class_names is None:
        class_names = getattr(dataset, "classes", None) or [f"class_{i}" for i in range(num_classes)]
    inner = _unwrap(model)
    _check_device(inner, device)
    total = len(dataset) if protocol.max_images is None else min(protocol.max_images, len(dataset))
    indices = range(rank, total, world_size)
    metric = SegmentationMetric(num_classes, ignore_index, device=device)
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            autocast,
            tqdm(
                total=len(indices), unit="img", desc=protocol.describe(), disable=not progress or rank != 0
            ) as bar,
        ):
            _count(inner, dataset, indices, protocol, metric, batch_size, device, bar)
    finally:
        model.train(was_training)
    confusion, num_images = metric.confusion, len(indices)
    if distributed:
        confusion, num_images = _all_reduce_counts(confusion, num_images)
    result = EvalResult(
        confusion,
        tuple(class_names),
        ignore_index,
        mode=protocol.mode,
        scales=protocol.scales,
        flip=protocol.flip,
        num_images=num_images,
        fusion=protocol.fusion,
    )
    log.info(
        "evaluated %d images (%s, scales %s, flip %s): mIoU %s %%, pixel accuracy %s %%",
        num_images,
        protocol.mode,
        result.scales,
        protocol.flip,
        percent(result.miou),
        percent(result.pixel_accuracy),
    )
    return result


def evaluate_protocols(
    model: nn.Module,
    dataset: Samples,
    *,
    eval_config: EvalConfig,
    num_classes: int,
    single_scale: EvalResult | None = None,
    **kwargs: Any,
) -> dict[str, EvalResult]:
    """Evaluate single-scale and with the configured scales and flip, both in ``eval_config.mode``.

    Args:
        model, dataset, num_classes: as for :func:`evaluate`.
        eval_config: mode, window geometry, scales, flip, fusion and max_images.
        single_scale: the single-scale result of this model on ``dataset`` in this mode, when it is already
            known (the training's validation of the best checkpoint): used instead of evaluating again.
        **kwargs: any other :func:`evaluate` keyword (ignore_index, class_names, device, rank, ...).

    Returns:
        ``{"single-scale": scales (1.0,) without flip, "multi-scale+flip": eval_config.scales and flip}``.
    """
    return {
        SINGLE_SCALE: single_scale
        or evaluate(
            model, dataset, EvalProtocol.single_scale(eval_config), num_classes=num_classes, **kwargs
        ),
        MULTI_SCALE: evaluate(
            model, dataset, EvalProtocol.multi_scale(eval_config), num_classes=num_classes, **kwargs
        ),
    }


__all__ = ["EvalProtocol", "evaluate", "evaluate_protocols"]
