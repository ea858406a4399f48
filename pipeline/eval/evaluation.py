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
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from ccnet.inference import predict_multiscale
from ccnet.metrics import (
    SegmentationMetric,
    mean_accuracy,
    mean_iou,
    per_class_accuracy,
    per_class_iou,
    pixel_accuracy,
)
from pipeline.config import EvalConfig

log = logging.getLogger(__name__)

SINGLE_SCALE = "single-scale"
MULTI_SCALE = "multi-scale+flip"
# The protocols' suffixes in metric names: final/mIoU_ss, final/mIoU_ms_flip, final/IoU_ss/<class>, ...
PROTOCOL_SUFFIX = {SINGLE_SCALE: "ss", MULTI_SCALE: "ms_flip"}


def metric_name(name: str) -> str:
    """``name`` made safe for a metric key: runs of characters other than letters, digits, ``_-.`` become
    ``_`` (``"traffic light"`` -> ``"traffic_light"``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


@dataclass
class EvalResult:
    """The confusion matrix of one evaluation and everything derived from it.

    Attributes:
        confusion: (K, K) int64 counts on the CPU, rows = ground truth, columns = prediction.
        class_names: K names, in class-id order.
        ignore_index: the label that was not counted.
        mode, scales, flip, fusion: the protocol that produced it (see :func:`evaluate`).
        num_images: how many images were counted (over all ranks).
    """

    confusion: Tensor
    class_names: tuple[str, ...]
    ignore_index: int = 255
    mode: str = "whole"
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    num_images: int = 0
    fusion: str = "logits"

    def __post_init__(self) -> None:
        self.confusion = torch.as_tensor(self.confusion).detach().to("cpu", torch.int64)
        if self.confusion.dim() != 2 or self.confusion.shape[0] != self.confusion.shape[1]:
            raise ValueError(f"confusion must be (K, K), got {tuple(self.confusion.shape)}")
        self.class_names = tuple(self.class_names)
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class names must be unique, got {self.class_names}")
        self.scales = tuple(float(scale) for scale in self.scales)

    @property
    def num_classes(self) -> int:
        return self.confusion.shape[0]

    @property
    def num_pixels(self) -> int:
        """Labelled pixels counted."""
        return int(self.confusion.sum())

    @property
    def miou(self) -> float:
        """Mean IoU over the classes present in the ground truth or the prediction (NaN if none is)."""
        return mean_iou(self.confusion)

    @property
    def iou(self) -> dict[str, float]:
        """Class name -> IoU, NaN for a class absent from both the ground truth and the prediction."""
        return dict(zip(self.class_names, per_class_iou(self.confusion).tolist(), strict=True))

    @property
    def class_accuracy(self) -> dict[str, float]:
        """Class name -> recall, NaN for a class absent from the ground truth."""
        return dict(zip(self.class_names, per_class_accuracy(self.confusion).tolist(), strict=True))

    @property
    def pixel_accuracy(self) -> float:
        return pixel_accuracy(self.confusion)

    @property
    def mean_accuracy(self) -> float:
        return mean_accuracy(self.confusion)

    def as_metrics(self, prefix: str = "val") -> dict[str, float]:
        """Flat metrics for a tracker: ``{prefix}/mIoU``, ``{prefix}/pixel_accuracy``,
        ``{prefix}/mean_accuracy`` and ``{prefix}/IoU/{class}`` (class names through :func:`metric_name`;
        a name that collides after cleaning gets ``_{class id}`` appended). Values are fractions in [0, 1],
        NaN for absent classes."""
        head = f"{prefix}/" if prefix else ""
        metrics = {
            f"{head}mIoU": self.miou,
            f"{head}pixel_accuracy": self.pixel_accuracy,
            f"{head}mean_accuracy": self.mean_accuracy,
        }
        for index, (name, value) in enumerate(self.iou.items()):
            key = f"{head}IoU/{metric_name(name)}"
            metrics[f"{key}_{index}" if key in metrics else key] = value
        return metrics

    def state(self) -> dict[str, Any]:
        """The result as plain values and one tensor, for a checkpoint (loads with ``weights_only=True``)."""
        return {"confusion": self.confusion.clone(), "class_names": list(self.class_names),
                "ignore_index": self.ignore_index, "mode": self.mode, "scales": list(self.scales),
                "flip": self.flip, "num_images": self.num_images, "fusion": self.fusion}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> EvalResult:
        """The inverse of :meth:`state`."""
        return cls(**{**state, "scales": tuple(state["scales"])})

    def table(self) -> str:
        """Markdown table of per-class IoU and accuracy (in %), then the means."""
        lines = ["| class | IoU (%) | accuracy (%) |", "|---|---:|---:|"]
        accuracy = self.class_accuracy
        for name, iou in self.iou.items():
            lines.append(f"| {name} | {_percent(iou)} | {_percent(accuracy[name])} |")
        lines.append(f"| **mean** | **{_percent(self.miou)}** | **{_percent(self.mean_accuracy)}** |")
        lines.append(f"\npixel accuracy {_percent(self.pixel_accuracy)} % over {self.num_pixels} pixels")
        return "\n".join(lines)


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
        return cls(config.mode, config.crop_size, config.stride, (1.0,), False, config.fusion,
                   config.max_images)

    @classmethod
    def multi_scale(cls, config: EvalConfig) -> EvalProtocol:
        """``config``'s mode and geometry with its scales and flip (the paper's multi-scale test)."""
        return cls(config.mode, config.crop_size, config.stride, tuple(config.scales), config.flip,
                   config.fusion, config.max_images)

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


def _count(model: nn.Module, dataset: Any, indices: range, protocol: EvalProtocol, metric: SegmentationMetric,
           batch_size: int, device: torch.device, bar: tqdm) -> None:
    """Predicts the images at ``indices`` in batches of consecutive images of one size, counting them."""
    for start in range(0, len(indices), batch_size):
        chunk = [dataset[i] for i in indices[start : start + batch_size]]
        for run in _shape_runs(chunk):
            images = torch.stack([torch.as_tensor(item["image"]) for item in run]).to(device)
            labels = torch.stack([torch.as_tensor(item["label"]) for item in run]).to(device)
            probs = predict_multiscale(
                model, images, scales=protocol.scales, flip=protocol.flip, mode=protocol.mode,
                crop_size=protocol.crop_size, stride=protocol.stride, num_classes=metric.num_classes,
                fusion=protocol.fusion,
            )  # (B, K, H, W)
            metric.update(probs.argmax(dim=1), labels.long())
        bar.update(len(chunk))


def evaluate(
    model: nn.Module,
    dataset: Sequence[Mapping[str, Any]] | torch.utils.data.Dataset,
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
        with torch.inference_mode(), autocast, tqdm(total=len(indices), unit="img", desc=protocol.describe(),
                                                    disable=not progress or rank != 0) as bar:
            _count(inner, dataset, indices, protocol, metric, batch_size, device, bar)
    finally:
        model.train(was_training)
    confusion, num_images = metric.confusion, len(indices)
    if distributed:
        confusion, num_images = _all_reduce_counts(confusion, num_images)
    result = EvalResult(
        confusion, tuple(class_names), ignore_index, mode=protocol.mode, scales=protocol.scales,
        flip=protocol.flip, num_images=num_images, fusion=protocol.fusion,
    )
    log.info(
        "evaluated %d images (%s, scales %s, flip %s): mIoU %s %%, pixel accuracy %s %%",
        num_images, protocol.mode, result.scales, protocol.flip, _percent(result.miou),
        _percent(result.pixel_accuracy),
    )
    return result


def evaluate_protocols(
    model: nn.Module,
    dataset: Sequence[Mapping[str, Any]] | torch.utils.data.Dataset,
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
        SINGLE_SCALE: single_scale or evaluate(model, dataset, EvalProtocol.single_scale(eval_config),
                                               num_classes=num_classes, **kwargs),
        MULTI_SCALE: evaluate(model, dataset, EvalProtocol.multi_scale(eval_config), num_classes=num_classes,
                              **kwargs),
    }


def summary_metrics(results: Mapping[str, EvalResult], prefix: str = "final") -> dict[str, float]:
    """The final results as short metric names, each figure once: ``{prefix}/mIoU_ss``,
    ``{prefix}/mIoU_ms_flip``, ``{prefix}/pixel_accuracy_ss``, ``{prefix}/mean_accuracy_ms_flip``, ... and the
    per-class ``{prefix}/IoU_ss/<class>`` (names as in :meth:`EvalResult.as_metrics`)."""
    metrics: dict[str, float] = {}
    for protocol, result in results.items():
        suffix = PROTOCOL_SUFFIX.get(protocol) or metric_name(protocol)
        for name, value in result.as_metrics("").items():
            head, _, tail = name.partition("/")
            metrics[f"{prefix}/{head}_{suffix}" + (f"/{tail}" if tail else "")] = value
    return metrics


def protocol_table(results: Mapping[str, EvalResult]) -> str:
    """Markdown: one row per protocol (settings, mIoU, pixel and mean accuracy, in %), then per-class IoU
    (%) with one column per protocol. All results must share the class names."""
    if not results:
        raise ValueError("no results to tabulate")
    names = {result.class_names for result in results.values()}
    if len(names) != 1:
        raise ValueError("results cover different classes")
    lines = [
        "| protocol | mode | scales | flip | images | mIoU (%) | pixel acc (%) | mean acc (%) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for protocol, result in results.items():
        cells = [
            protocol,
            result.mode,
            ", ".join(f"{scale:g}" for scale in result.scales),
            "yes" if result.flip else "no",
            str(result.num_images),
            _percent(result.miou),
            _percent(result.pixel_accuracy),
            _percent(result.mean_accuracy),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| class | " + " | ".join(f"IoU (%) {p}" for p in results) + " |"]
    lines.append("|---|" + "---:|" * len(results))
    ious = [result.iou for result in results.values()]
    for name in next(iter(names)):
        lines.append(f"| {name} | " + " | ".join(_percent(iou[name]) for iou in ious) + " |")
    return "\n".join(lines)


__all__ = [
    "MULTI_SCALE",
    "SINGLE_SCALE",
    "EvalProtocol",
    "EvalResult",
    "evaluate",
    "evaluate_protocols",
    "metric_name",
    "protocol_table",
]
