"""What an evaluation returns and how it is reported: :class:`EvalResult` (a confusion matrix with the
protocol that produced it, and its IoU and accuracies), the protocols' names, the final results' metric names
and the markdown table of several protocols."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ccnet.metrics import mean_accuracy, mean_iou, per_class_accuracy, per_class_iou, pixel_accuracy

SINGLE_SCALE = "single-scale"
MULTI_SCALE = "multi-scale+flip"
# The protocols' suffixes in metric names: final/mIoU_ss, final/mIoU_ms_flip, final/IoU_ss/<class>, ...
PROTOCOL_SUFFIX = {SINGLE_SCALE: "ss", MULTI_SCALE: "ms_flip"}
VAL_MIOU = "val/mIoU"  # a training's validation (single-scale) at every eval_every; tune.metric's default
FINAL_MIOU_SS = f"final/mIoU_{PROTOCOL_SUFFIX[SINGLE_SCALE]}"  # the best checkpoint's, at the run's end
FINAL_MIOU_MS = f"final/mIoU_{PROTOCOL_SUFFIX[MULTI_SCALE]}"


def metric_name(name: str) -> str:
    """``name`` made safe for a metric key: runs of characters other than letters, digits, ``_-.`` become
    ``_`` (``"traffic light"`` -> ``"traffic_light"``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def class_keys(class_names: Sequence[str]) -> list[str]:
    """Each class's name in metric keys (``IoU/<key>``): :func:`metric_name`, with ``_<class id>`` appended to
    a name that collides with an earlier one once cleaned."""
    keys: list[str] = []
    for index, name in enumerate(class_names):
        key = metric_name(name)
        keys.append(f"{key}_{index}" if key in keys else key)
    return keys


def percent(value: float) -> str:
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
        for key, value in zip(class_keys(self.class_names), self.iou.values(), strict=True):
            metrics[f"{head}IoU/{key}"] = value
        return metrics

    def state(self) -> dict[str, Any]:
        """The result as plain values and one tensor, for a checkpoint (loads with ``weights_only=True``)."""
        return {
            "confusion": self.confusion.clone(),
            "class_names": list(self.class_names),
            "ignore_index": self.ignore_index,
            "mode": self.mode,
            "scales": list(self.scales),
            "flip": self.flip,
            "num_images": self.num_images,
            "fusion": self.fusion,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> EvalResult:
        """The inverse of :meth:`state`."""
        return cls(**{**state, "scales": tuple(state["scales"])})

    def table(self) -> str:
        """Markdown table of per-class IoU and accuracy (in %), then the means."""
        lines = ["| class | IoU (%) | accuracy (%) |", "|---|---:|---:|"]
        accuracy = self.class_accuracy
        for name, iou in self.iou.items():
            lines.append(f"| {name} | {percent(iou)} | {percent(accuracy[name])} |")
        lines.append(f"| **mean** | **{percent(self.miou)}** | **{percent(self.mean_accuracy)}** |")
        lines.append(f"\npixel accuracy {percent(self.pixel_accuracy)} % over {self.num_pixels} pixels")
        return "\n".join(lines)


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
            percent(result.miou),
            percent(result.pixel_accuracy),
            percent(result.mean_accuracy),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| class | " + " | ".join(f"IoU (%) {p}" for p in results) + " |"]
    lines.append("|---|" + "---:|" * len(results))
    ious = [result.iou for result in results.values()]
    for name in next(iter(names)):
        lines.append(f"| {name} | " + " | ".join(percent(iou[name]) for iou in ious) + " |")
    return "\n".join(lines)
