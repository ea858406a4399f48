"""Test-time prediction: whole image, sliding window, multi-scale with horizontal flip.

Every function takes a segmentation model (``model(image)["out"]`` is (B, K, h, w) logits) and a normalised
image batch (B, 3, H, W), and returns class probabilities (B, K, H, W) in float32 that sum to 1 over K. They
run under :func:`torch.inference_mode` on whatever device the model and image already share, and feed the
image in its own dtype. They do not touch the model's mode: call ``model.eval()`` first, or batch norm and
dropout behave as in training.

Two choices follow the authors' code (speedinghzl/CCNet ``evaluate.py``) by default:

- ``fusion="logits"``: overlapping windows, scales and flips are averaged as logits, and the softmax is taken
  once at the end; ``fusion="probs"`` averages the per-pass probabilities instead.
- ``align_corners=None``: every bilinear resize (image to a scale, logits back to the image) uses the model's
  ``config.align_corners`` (:class:`ccnet.models.CCNetConfig`), or False for a model without one, so that
  inference rescales the way the model upsamples.

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


FUSIONS = ("logits", "probs")


def _resize(x: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    """Bilinear resize of (B, C, h, w) to ``size``; a no-op when it already fits."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _align_corners(model: nn.Module, align_corners: bool | None) -> bool:
    """``align_corners``, or when None the model's ``config.align_corners`` (False if it has none)."""
    if align_corners is not None:
        return align_corners
    return bool(getattr(getattr(model, "config", None), "align_corners", False))


def _check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")


def _whole_scores(model: nn.Module, image: Tensor, fusion: str, align_corners: bool) -> Tensor:
    """(B, K, H, W) float32 logits (``fusion="logits"``) or probabilities of one forward pass at H x W."""
    height, width = image.shape[-2:]
    logits = _resize(model(image)["out"].float(), (height, width), align_corners)
    return logits if fusion == "logits" else logits.softmax(dim=1)


def _to_probs(scores: Tensor, fusion: str) -> Tensor:
    """Probabilities from fused scores: the softmax of fused logits; fused probabilities as they are."""
    return scores.softmax(dim=1) if fusion == "logits" else scores


@torch.inference_mode()
def predict_whole(model: nn.Module, image: Tensor, align_corners: bool | None = None) -> Tensor:
    """Predict the whole image in one forward pass.

    Args:
        model: segmentation model (see the module docstring); only its ``"out"`` is used.
        image: (B, 3, H, W) normalised images.
        align_corners: of the bilinear resize below; None follows the model (see the module docstring).

    Returns:
        (B, K, H, W) float32 probabilities: the softmax of the logits, which are first resized bilinearly
        to H x W if the model returned another size.
    """
    return _whole_scores(model, image, "probs", _align_corners(model, align_corners))


@torch.inference_mode()
def predict_sliding(
    model: nn.Module,
    image: Tensor,
    crop_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    num_classes: int,
    fusion: str = "logits",
    align_corners: bool | None = None,
) -> Tensor:
    """Predict overlapping crop-sized windows and average their logits (or probabilities).

    The image is zero-padded at the bottom/right to at least ``crop_size``; windows start every ``stride``
    pixels and the last one in each direction is shifted back to end at the border, so every pixel is
    covered (``max(H - crop + stride - 1, 0) // stride + 1`` windows per column, as mmsegmentation's
    ``slide_inference``). Each pixel gets the mean of the logits (``fusion="logits"``, then one softmax) or of
    the probabilities (``fusion="probs"``) of the windows covering it, and the padding is cropped away.

    Args:
        model: segmentation model (see the module docstring).
        image: (B, 3, H, W) normalised images.
        crop_size: window size, an int or (height, width); 769 in the CCNet protocol.
        stride: step between windows, an int or (height, width), at most ``crop_size`` so windows leave no
            gap; 513 in the CCNet protocol.
        num_classes: K, the number of channels the model returns.
        fusion: ``"logits"`` (the authors') or ``"probs"``: what is averaged over overlapping windows.
        align_corners: of the bilinear resizes; None follows the model (see the module docstring).

    Returns:
        (B, K, H, W) float32 probabilities.
    """
    _check_fusion(fusion)
    scores = _sliding_scores(
        model, image, crop_size, stride, num_classes, fusion, _align_corners(model, align_corners)
    )
    return _to_probs(scores, fusion)


def _sliding_scores(
    model: nn.Module,
    image: Tensor,
    crop_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    num_classes: int,
    fusion: str,
    align_corners: bool,
) -> Tensor:
    """:func:`predict_sliding` before the final softmax: (B, K, H, W) mean logits or mean probabilities."""
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

    scores = torch.zeros(batch, num_classes, padded_h, padded_w, dtype=torch.float32, device=image.device)
    count = torch.zeros(1, 1, padded_h, padded_w, dtype=torch.float32, device=image.device)
    for row in range(rows):
        for col in range(cols):
            # Clamp to the border: the last window ends at the edge and overlaps its neighbour more.
            top = min(row * stride_h, padded_h - crop_h)
            left = min(col * stride_w, padded_w - crop_w)
            window = padded[:, :, top : top + crop_h, left : left + crop_w]
            window_scores = _whole_scores(model, window, fusion, align_corners)
            if window_scores.shape[1] != num_classes:
                raise ValueError(f"model returned {window_scores.shape[1]} classes, expected {num_classes}")
            scores[:, :, top : top + crop_h, left : left + crop_w] += window_scores
            count[:, :, top : top + crop_h, left : left + crop_w] += 1
    return (scores / count)[:, :, :height, :width]


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
    fusion: str = "logits",
    align_corners: bool | None = None,
) -> Tensor:
    """Average the logits (or probabilities) of several rescaled (and optionally flipped) passes.

    For each scale the image is resized bilinearly to ``round(scale * H) x round(scale * W)``, predicted
    whole or by sliding window, and the pass's logits (``fusion="logits"``) or probabilities
    (``fusion="probs"``) are resized back to H x W. With ``flip``, each scale also predicts the horizontally
    flipped image and flips its scores back. All ``len(scales) * (1 + flip)`` passes are weighted equally;
    with ``fusion="logits"`` (the authors' ``predict_multiscale``) the softmax is taken once, of the mean.

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
        fusion: ``"logits"`` (the authors') or ``"probs"``: what is averaged over windows and passes.
        align_corners: of every bilinear resize; None follows the model (see the module docstring).

    Returns:
        (B, K, H, W) float32 probabilities.
    """
    _check_fusion(fusion)
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

    corners = _align_corners(model, align_corners)

    def predict(x: Tensor) -> Tensor:
        if mode == "slide":
            assert crop_size is not None and stride is not None and num_classes is not None  # checked above
            return _sliding_scores(model, x, crop_size, stride, num_classes, fusion, corners)
        return _whole_scores(model, x, fusion, corners)

    height, width = image.shape[-2:]
    total: Tensor | None = None
    passes = 0
    for scale in scales:
        # int(x + 0.5) rounds halves up (Python's round() would round them to even).
        size = (max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1))
        scaled = _resize(image, size, corners)
        outputs = [predict(scaled)]
        if flip:
            outputs.append(predict(scaled.flip(-1)).flip(-1))
        for scores in outputs:
            scores = _resize(scores, (height, width), corners)
            total = scores if total is None else total + scores
            passes += 1
    assert total is not None  # scales is not empty
    return _to_probs(total / passes, fusion)


__all__ = ["FUSIONS", "predict_multiscale", "predict_sliding", "predict_whole"]


class LogitsOnly(nn.Module):
    """A segmentation model whose forward returns only the main logits ``(B, K, H, W)``: the form MLflow's
    PyTorch flavour serves (one output tensor), and ``torch.export`` traces. ``model`` keeps the original,
    with its ``config`` and ``normalization``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image)["out"]
