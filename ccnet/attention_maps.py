"""Where a pixel looks: composed criss-cross attention maps over the whole image (the paper's Fig. 6).

After one criss-cross step a pixel ``p`` pays attention ``A_1[p, q]`` to the pixels ``q`` of its row and
column. After two steps it pays ``sum_q A_2[p, q] * A_1[q, r]`` to every pixel ``r``: the step-2 attention
of ``p`` propagated through the step-1 attention of the pixels it looked at. The residual paths and the
value/projection convs are left out, as in the paper's figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ccnet.attention import CrissCrossAttention, RecurrentAttention
from ccnet.models import CCNet


def _propagate(maps: Tensor, attention: Tensor) -> Tensor:
    """Pull per-pixel weights back through one criss-cross step.

    Args:
        maps: (B, P, H, W) weights over the pixels ``q`` that the chosen pixels reach after later steps.
        attention: (B, H, W, H + W) step attention (column part first, then row part).

    Returns:
        (B, P, H, W): ``out[r] = sum_q maps[q] * attention[q, r]``.
    """
    height = attention.shape[1]
    # q = (h, w) gives to r = (j, w) in its column and to r = (h, j) in its row.
    along_columns = torch.einsum("bphw,bhwj->bpjw", maps, attention[..., :height])
    along_rows = torch.einsum("bphw,bhwj->bphj", maps, attention[..., height:])
    return along_columns + along_rows


@torch.no_grad()
def criss_cross_attention_maps(
    attention: CrissCrossAttention, features: Tensor, pixels: Sequence[tuple[int, int]], recurrence: int = 2
) -> Tensor:
    """Attention that chosen pixels pay over the whole feature map after each of ``recurrence`` steps.

    Args:
        attention: the (shared-weight) criss-cross module.
        features: (B, C, H, W) input of the first step.
        pixels: ``(row, column)`` feature-map coordinates of the pixels to explain.
        recurrence: number of steps R to run.

    Returns:
        (R, B, P, H, W): entry ``r - 1`` is the attention after ``r`` steps, composed; each map sums to 1.
    """
    if recurrence < 1:
        raise ValueError(f"recurrence must be >= 1 for attention maps, got {recurrence}")
    batch, _, height, width = features.shape
    for row, column in pixels:
        if not (0 <= row < height and 0 <= column < width):
            raise ValueError(f"pixel {(row, column)} is outside the {height}x{width} feature map")
    step_attention = []
    for _ in range(recurrence):
        weights, _ = attention.attention_weights(features)
        step_attention.append(weights.float())
        features = attention(features)
    start = features.new_zeros(batch, len(pixels), height, width, dtype=torch.float32)
    for index, (row, column) in enumerate(pixels):
        start[:, index, row, column] = 1.0
    composed = []
    for steps in range(1, recurrence + 1):
        maps = start
        for weights in reversed(step_attention[:steps]):
            maps = _propagate(maps, weights)
        composed.append(maps)
    return torch.stack(composed)


@torch.no_grad()
def ccnet_attention_maps(
    model: CCNet, image: Tensor, pixels: Sequence[tuple[int, int]], recurrence: int | None = None
) -> Tensor:
    """Composed attention maps of a CCNet's head for pixels given in image coordinates.

    Args:
        model: a CCNet with criss-cross attention in its head (call ``model.eval()`` first).
        image: (B, 3, H, W) normalised input.
        pixels: ``(row, column)`` image coordinates; mapped to the nearest feature pixel.
        recurrence: steps to compose; defaults to the model's R.

    Returns:
        (R, B, P, h, w) maps at the feature resolution (upsample for display).
    """
    recurrent = model.head.attention
    if not (
        isinstance(recurrent, RecurrentAttention) and isinstance(recurrent.attention, CrissCrossAttention)
    ):
        raise ValueError("attention maps need a model with criss-cross attention in its head")
    features = model.head.reduce(model.backbone(image, stem_hook=model.stem_attention)["out"])
    scale_y = features.shape[2] / image.shape[2]
    scale_x = features.shape[3] / image.shape[3]
    feature_pixels = [
        (min(int(row * scale_y), features.shape[2] - 1), min(int(col * scale_x), features.shape[3] - 1))
        for row, col in pixels
    ]
    steps = recurrent.recurrence if recurrence is None else recurrence
    return criss_cross_attention_maps(recurrent.attention, features, feature_pixels, steps)
