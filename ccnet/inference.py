"""Test-time prediction: whole image, sliding window, multi-scale with horizontal flip.

Every function takes a segmentation model (``model(image)["out"]`` is (B, K, h, w) logits) and a normalised
image batch (B, 3, H, W), and returns class probabilities (B, K, H, W) in float32 that sum to 1 over K. They
run under :func:`torch.inference_mode` on whatever device the model and image already share, and feed the
image in its own dtype. They do not touch the model's mode: call ``model.eval()`` first, or batch norm and
dropout behave as in training.

The reference CCNet protocol on Cityscapes (as in mmsegmentation's ``slide_inference``)::

    probs = predict_sliding(model, image, crop_size=769, stride=513, num_classes=19)
    probs = predict_multiscale(model, image, scales=(0.75, 1.0, 1.25), flip=True, mode="slide",
                               crop_size=769, stride=513, num_classes=19)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``value`` as (height, width), both positive."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of (B, C, h, w) to ``size``; a no-op when it already fits."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def predict_whole(model: nn.Module, image: Tensor) -> Tensor:
    """Predict the whole image in one forward pass.

    Args:
        model: segmentation model (see the module docstring); only its ``"out"`` is used.
        image: (B, 3, H, W) normalised images.

    Returns:
        (B, K, H, W) float32 probabilities: the softmax of the logits, which are first resized bilinearly
        to H x W if the model returned another size.
    """
    logits = model(image)["out"]
    logits = _resize(logits.float(), tuple(image.shape[-2:]))
    return logits.softmax(dim=1)


@torch.inference_mode()
def predict_sliding(
    model: nn.Module,
    image: Tensor,
    crop_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    num_classes: int,
) -> Tensor:
    """Predict overlapping crop-sized windows and average their probabilities.

    The image is zero-padded at the bottom/right to at least ``crop_size``; windows start every ``stride``
    pixels and the last one in each direction is shifted back to end at the border, so every pixel is
    covered (``max(H - crop + stride - 1, 0) // stride + 1`` windows per column, as mmsegmentation's
    ``slide_inference``). Each pixel gets the mean of the probabilities of the windows covering it, and the
    padding is cropped away.

    Args:
        model: segmentation model (see the module docstring).
        image: (B, 3, H, W) normalised images.
        crop_size: window size, an int or (height, width); 769 in the CCNet protocol.
        stride: step between windows, an int or (height, width), at most ``crop_size`` so windows leave no
            gap; 513 in the CCNet protocol.
        num_classes: K, the number of channels the model returns.

    Returns:
        (B, K, H, W) float32 probabilities.
    """
    crop_h, crop_w = _pair(crop_size, "crop_size")
    stride_h, stride_w = _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"stride {stride!r} larger than crop_size {crop_size!r} leaves pixels uncovered")
    batch, _, height, width = image.shape
    # Zero is the dataset mean after normalisation: padding looks like a flat grey border.
    padded = F.pad(image, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))
    padded_h, padded_w = padded.shape[-2:]
    rows = max(padded_h - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(padded_w - crop_w + stride_w - 1, 0) // stride_w + 1

    probs = torch.zeros(batch, num_classes, padded_h, padded_w, dtype=torch.float32, device=image.device)
    count = torch.zeros(1, 1, padded_h, padded_w, dtype=torch.float32, device=image.device)
    for row in range(rows):
        for col in range(cols):
            # Clamp to the border: the last window ends at the edge and overlaps its neighbour more.
            top = min(row * stride_h, padded_h - crop_h)
            left = min(col * stride_w, padded_w - crop_w)
            window = padded[:, :, top : top + crop_h, left : left + crop_w]
            window_probs = predict_whole(model, window)
            if window_probs.shape[1] != num_classes:
                raise ValueError(f"model returned {window_probs.shape[1]} classes, expected {num_classes}")
            probs[:, :, top : top + crop_h, left : left + crop_w] += window_probs
            count[:, :, top : top + crop_h, left : left + crop_w] += 1
    return (probs / count)[:, :, :height, :width]


@torch.inference_mode()
def predict_multiscale(
    model: nn.Module,
    image: Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    crop_size: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
) -> Tensor:
    """Average the probabilities of several rescaled (and optionally flipped) passes.

    For each scale the image is resized bilinearly to ``round(scale * H) x round(scale * W)``, predicted
    whole or by sliding window, and the probabilities are resized back to H x W. With ``flip``, each scale
    also predicts the horizontally flipped image and flips its probabilities back. All
    ``len(scales) * (1 + flip)`` passes are weighted equally.

    Args:
        model: segmentation model (see the module docstring).
        image: (B, 3, H, W) normalised images.
        scales: positive resize factors; ``(1.0,)`` without flip is :func:`predict_whole` (or
            :func:`predict_sliding`).
        flip: also predict the mirrored image at every scale.
        mode: ``"whole"`` (:func:`predict_whole`) or ``"slide"`` (:func:`predict_sliding`).
        crop_size: window size for ``mode="slide"``.
        stride: window step for ``mode="slide"``.
        num_classes: K, required for ``mode="slide"``.

    Returns:
        (B, K, H, W) float32 probabilities.
    """
    if len(scales) == 0:
        raise ValueError("scales must not be empty")
    if any(not (0 < scale < math.inf) for scale in scales):
        raise ValueError(f"scales must all be positive and finite, got {tuple(scales)}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide":
        missing = [
            name
            for name, value in (("crop_size", crop_size), ("stride", stride), ("num_classes", num_classes))
            if value is None
        ]
        if missing:
            raise ValueError(f"mode='slide' needs {', '.join(missing)}")

    def predict(x: Tensor) -> Tensor:
        if mode == "slide":
            return predict_sliding(model, x, crop_size, stride, num_classes)
        return predict_whole(model, x)

    height, width = image.shape[-2:]
    total = None
    passes = 0
    for scale in scales:
        # int(x + 0.5) rounds halves up (Python's round() would round them to even).
        size = (max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1))
        scaled = _resize(image, size)
        outputs = [predict(scaled)]
        if flip:
            outputs.append(predict(scaled.flip(-1)).flip(-1))
        for probs in outputs:
            probs = _resize(probs, (height, width))
            total = probs if total is None else total + probs
            passes += 1
    return total / passes


__all__ = ["predict_multiscale", "predict_sliding", "predict_whole"]
