"""Semantic-segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel and mean accuracy.

Everything is derived from one (K, K) int64 confusion matrix (rows = ground truth, columns = prediction).
Counts are exact integers, so confusion matrices are mergeable: summing the matrices of disjoint sets of
pixels (batches, data shards, workers) and computing the metrics once gives exactly the metrics of the union.
On several workers::

    metric = SegmentationMetric(num_classes, device=device)
    for image, target in loader:
        metric.update(model(image)["out"], target)
    torch.distributed.all_reduce(metric.confusion, op=torch.distributed.ReduceOp.SUM)
    scores = metric.compute()

Ratios are computed in float64; a ratio whose denominator is 0 is NaN and is left out of the means
(``nanmean``), so a class absent from both the ground truth and the prediction does not count as IoU 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Count (ground truth, prediction) pairs over the valid pixels.

    Args:
        pred: predicted class indices, any integer dtype, same shape as ``target``, values in
            ``[0, num_classes)`` wherever the target is valid.
        target: ground-truth class indices (e.g. (B, H, W) int64). Pixels equal to ``ignore_index`` or
            outside ``[0, num_classes)`` are not counted.
        num_classes: K.
        ignore_index: label of unannotated pixels.

    Returns:
        (K, K) int64 on ``target``'s device; entry ``[i, j]`` counts pixels of class i predicted as j.

    Raises:
        ValueError: if the shapes differ or a prediction at a valid pixel is outside ``[0, num_classes)``
            (it would otherwise be counted in the wrong cell).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    pred = pred[valid].long()
    target = target[valid].long()
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"pred has class indices outside [0, {num_classes}) at labelled pixels")
    # Each (gt, pred) pair gets its own bin: gt * K + pred in [0, K * K), the row-major cell index.
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)  # (K * K,) -> (K, K)


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` in float64, NaN where the denominator is 0."""
    numerator, denominator = numerator.double(), denominator.double()
    return torch.where(denominator > 0, numerator / denominator, torch.full_like(numerator, float("nan")))


def per_class_iou(confusion: Tensor) -> Tensor:
    """IoU of each class, TP / (TP + FP + FN): (K,) float64, NaN for a class with an empty union."""
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=1) + confusion.sum(dim=0) - true_positive
    return _ratio(true_positive, union)


def per_class_accuracy(confusion: Tensor) -> Tensor:
    """Recall of each class, TP / (TP + FN): (K,) float64, NaN for a class absent from the ground truth."""
    return _ratio(confusion.diagonal(), confusion.sum(dim=1))


def pixel_accuracy(confusion: Tensor) -> float:
    """Fraction of counted pixels predicted correctly; NaN if nothing was counted."""
    return _ratio(confusion.diagonal().sum(), confusion.sum()).item()


def mean_iou(confusion: Tensor) -> float:
    """Mean of :func:`per_class_iou` over the classes whose IoU is defined (NaN if none is)."""
    return per_class_iou(confusion).nanmean().item()


def mean_accuracy(confusion: Tensor) -> float:
    """Mean of :func:`per_class_accuracy` over the classes present in the ground truth (NaN if none is)."""
    return per_class_accuracy(confusion).nanmean().item()


class SegmentationMetric:
    """Accumulate a confusion matrix over batches and compute IoU and accuracy from it.

    Args:
        num_classes: K.
        ignore_index: label of unannotated pixels; they are not counted.
        device: where :attr:`confusion` lives; for ``all_reduce`` with NCCL it must be the worker's GPU.

    Attributes:
        confusion: (K, K) int64 running counts, rows = ground truth, columns = prediction. A distributed
            caller may ``all_reduce`` it (SUM) in place before :meth:`compute`; the result is exact.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self.confusion.sum())})"
        )

    def update(self, pred_or_logits: Tensor, target: Tensor) -> None:
        """Add one batch to the counts.

        Args:
            pred_or_logits: class indices with ``target``'s shape (B, H, W), or scores (B, K, H, W) of
                which the argmax over dim 1 is taken (logits and probabilities give the same result).
            target: (B, H, W) ground-truth class indices, ``ignore_index`` where unlabelled.
        """
        if pred_or_logits.dim() == target.dim() + 1:
            if pred_or_logits.shape[1] != self.num_classes:
                raise ValueError(
                    f"scores have {pred_or_logits.shape[1]} channels, expected num_classes={self.num_classes}"
                )
            pred_or_logits = pred_or_logits.argmax(dim=1)
        batch = confusion_matrix(pred_or_logits, target, self.num_classes, self.ignore_index)
        self.confusion += batch.to(self.confusion.device)

    def merge(self, other: SegmentationMetric) -> SegmentationMetric:
        """Add ``other``'s counts to this metric in place and return it; ``other`` is unchanged."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge metrics over (num_classes, ignore_index) = "
                f"{(other.num_classes, other.ignore_index)} into {(self.num_classes, self.ignore_index)}"
            )
        self.confusion += other.confusion.to(self.confusion.device)
        return self

    def __iadd__(self, other: SegmentationMetric) -> SegmentationMetric:
        return self.merge(other)

    def reset(self) -> None:
        """Zero the counts (in place, so a reference to :attr:`confusion` stays valid)."""
        self.confusion.zero_()

    def compute(self) -> dict[str, Tensor | float]:
        """Metrics of everything counted so far.

        Returns:
            ``iou`` (K,) and ``class_accuracy`` (K,) float64 tensors on the CPU (NaN where undefined, see
            the module docstring), and the floats ``miou``, ``pixel_accuracy`` and ``mean_accuracy``.
        """
        confusion = self.confusion.cpu()
        return {
            "iou": per_class_iou(confusion),
            "miou": mean_iou(confusion),
            "class_accuracy": per_class_accuracy(confusion),
            "pixel_accuracy": pixel_accuracy(confusion),
            "mean_accuracy": mean_accuracy(confusion),
        }


__all__ = [
    "SegmentationMetric",
    "confusion_matrix",
    "mean_accuracy",
    "mean_iou",
    "per_class_accuracy",
    "per_class_iou",
    "pixel_accuracy",
]
