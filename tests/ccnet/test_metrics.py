"""Segmentation metrics against hand-computed values and a pure-Python confusion matrix."""

from __future__ import annotations

import math

import pytest
import torch

from ccnet.metrics import (
    SegmentationMetric,
    confusion_matrix,
    mean_iou,
    per_class_accuracy,
    per_class_iou,
    pixel_accuracy,
)

IGNORE = 255

# Hand example, 3 classes, 10 pixels of which the last two are unlabelled.
#   gt 0 -> predicted 0, 0, 1 ; gt 1 -> 1, 1, 2 ; gt 2 -> 2, 0
HAND_TARGET = torch.tensor([[[0, 0, 0, 1, 1], [1, 2, 2, IGNORE, IGNORE]]])  # (1, 2, 5)
HAND_PRED = torch.tensor([[[0, 0, 1, 1, 1], [2, 2, 0, 1, 2]]])
HAND_CONFUSION = torch.tensor([[2, 1, 0], [0, 2, 1], [1, 0, 1]])
# IoU = TP / (TP + FP + FN): class 0: 2 / (2 + 1 + 1), class 1: 2 / (2 + 1 + 1), class 2: 1 / (1 + 1 + 1).
HAND_IOU = [2 / 4, 2 / 4, 1 / 3]
HAND_MIOU = (1 / 2 + 1 / 2 + 1 / 3) / 3  # 4 / 9
HAND_PIXEL_ACCURACY = 5 / 8
HAND_CLASS_ACCURACY = [2 / 3, 2 / 3, 1 / 2]
HAND_MEAN_ACCURACY = (2 / 3 + 2 / 3 + 1 / 2) / 3  # 11 / 18


def _loop_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[list[int]]:
    counts = [[0] * num_classes for _ in range(num_classes)]
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t != IGNORE and 0 <= t < num_classes:
            counts[t][p] += 1
    return counts


def test_confusion_matrix_matches_python_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    num_classes = 5
    pred = torch.randint(0, num_classes, (3, 7, 9), generator=generator)
    # Labels include ignored pixels and an out-of-range class (5), which must not be counted either.
    target = torch.randint(0, num_classes + 1, (3, 7, 9), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = IGNORE
    assert (target == IGNORE).any() and (target == num_classes).any()

    confusion = confusion_matrix(pred, target, num_classes, IGNORE)

    assert confusion.dtype == torch.int64 and confusion.shape == (num_classes, num_classes)
    assert confusion.tolist() == _loop_confusion(pred, target, num_classes)


def test_confusion_matrix_rejects_bad_inputs() -> None:
    target = torch.zeros(1, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="shapes"):
        confusion_matrix(torch.zeros(1, 2, 3, dtype=torch.int64), target, 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.full((1, 2, 2), 3), target, 3)


def test_hand_example() -> None:
    assert torch.equal(confusion_matrix(HAND_PRED, HAND_TARGET, 3), HAND_CONFUSION)
    metric = SegmentationMetric(3)
    metric.update(HAND_PRED, HAND_TARGET)
    scores = metric.compute()

    assert torch.equal(metric.confusion, HAND_CONFUSION)
    assert scores["iou"].tolist() == pytest.approx(HAND_IOU, abs=1e-12)
    assert scores["miou"] == pytest.approx(HAND_MIOU, abs=1e-12)
    assert scores["pixel_accuracy"] == pytest.approx(HAND_PIXEL_ACCURACY, abs=1e-12)
    assert scores["class_accuracy"].tolist() == pytest.approx(HAND_CLASS_ACCURACY, abs=1e-12)
    assert scores["mean_accuracy"] == pytest.approx(HAND_MEAN_ACCURACY, abs=1e-12)


def test_absent_class_is_nan_and_left_out_of_the_mean() -> None:
    # Class 3 appears in neither the ground truth nor the prediction; class 4 only in the prediction.
    pred = HAND_PRED.clone()
    pred[0, 1, 4] = 4  # an unlabelled pixel: not counted, class 4 stays absent
    metric = SegmentationMetric(5)
    metric.update(pred, HAND_TARGET)
    iou = metric.compute()["iou"]
    assert math.isnan(iou[3]) and math.isnan(iou[4])
    assert metric.compute()["miou"] == pytest.approx(HAND_MIOU, abs=1e-12)

    # A class predicted but absent from the ground truth is a real IoU of 0 and lowers the mean.
    pred[0, 0, 0] = 4  # a labelled class-0 pixel now predicted as 4
    confusion = confusion_matrix(pred, HAND_TARGET, 5)
    iou = per_class_iou(confusion)
    assert iou[4].item() == 0.0 and math.isnan(iou[3])
    # class 0 now: TP 1, FP 1 (the gt-2 pixel), FN 2 -> 1 / 4
    assert mean_iou(confusion) == pytest.approx((1 / 4 + 1 / 2 + 1 / 3 + 0) / 4, abs=1e-12)
    assert math.isnan(per_class_accuracy(confusion)[4])


def test_empty_metric_is_nan() -> None:
    scores = SegmentationMetric(3).compute()
    assert math.isnan(scores["miou"]) and math.isnan(scores["mean_accuracy"])
    assert math.isnan(pixel_accuracy(torch.zeros(3, 3, dtype=torch.int64)))


def test_merging_halves_equals_the_whole_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    num_classes = 4
    logits = torch.randn(6, num_classes, 5, 8, generator=generator)
    target = torch.randint(0, num_classes, (6, 5, 8), generator=generator)
    target[:, 0] = IGNORE

    whole = SegmentationMetric(num_classes)
    whole.update(logits, target)
    first, second = SegmentationMetric(num_classes), SegmentationMetric(num_classes)
    first.update(logits[:2], target[:2])
    second.update(logits[2:], target[2:])
    second_before = second.confusion.clone()
    merged = first.merge(second)

    assert merged is first
    assert torch.equal(second.confusion, second_before)
    assert torch.equal(merged.confusion, whole.confusion)
    assert merged.compute()["miou"] == whole.compute()["miou"]
    assert torch.equal(merged.compute()["iou"], whole.compute()["iou"])

    summed = SegmentationMetric(num_classes)
    summed += first
    assert torch.equal(summed.confusion, whole.confusion)
    with pytest.raises(ValueError, match="merge"):
        summed.merge(SegmentationMetric(num_classes + 1))


def test_logits_equal_their_argmax_and_reset_clears() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 6, 6, generator=generator)
    target = torch.randint(0, 3, (2, 6, 6), generator=generator)
    from_logits, from_indices = SegmentationMetric(3), SegmentationMetric(3)
    from_logits.update(logits, target)
    from_indices.update(logits.argmax(dim=1), target)
    assert torch.equal(from_logits.confusion, from_indices.confusion)
    assert from_logits.confusion.sum() == target.numel()

    confusion = from_logits.confusion
    from_logits.reset()
    assert from_logits.confusion is confusion and confusion.sum() == 0
    with pytest.raises(ValueError, match="num_classes"):
        from_logits.update(torch.randn(2, 4, 6, 6), target)
