"""Composed attention maps against dense attention matrices."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ccnet import CrissCrossAttention, build_ccnet
from ccnet.attention_maps import ccnet_attention_maps, criss_cross_attention_maps


def _dense_attention(module: CrissCrossAttention, x: Tensor) -> Tensor:
    """(B, HW, HW) attention matrix of one step, from dense energies with a criss-cross mask."""
    height, width = x.shape[2:]
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    allowed = (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])
    energy = torch.einsum("bci,bcj->bij", module.query(x).flatten(2), module.key(x).flatten(2))
    return energy.masked_fill(~allowed, float("-inf")).softmax(-1)


@torch.no_grad()
def test_maps_compose_the_steps() -> None:
    torch.manual_seed(0)
    module = CrissCrossAttention(16)
    module.gamma.fill_(0.8)
    x = torch.randn(2, 16, 5, 7)
    pixels = [(0, 0), (2, 3), (4, 6)]
    maps = criss_cross_attention_maps(module, x, pixels, recurrence=2)
    assert maps.shape == (2, 2, 3, 5, 7)

    first = _dense_attention(module, x)
    second = _dense_attention(module, module(x))
    composed = second @ first  # (B, HW, HW): p -> q at step 2, then q -> r at step 1
    for index, (row, col) in enumerate(pixels):
        flat = row * 7 + col
        torch.testing.assert_close(maps[0, :, index].flatten(1), first[:, flat])
        torch.testing.assert_close(maps[1, :, index].flatten(1), composed[:, flat])
        outside_cross = torch.ones(5, 7, dtype=torch.bool)
        outside_cross[row, :] = outside_cross[:, col] = False
        assert torch.all(maps[0, :, index][:, outside_cross] == 0)  # R=1: the row and column only
        assert torch.all(maps[1, :, index] > 0)  # R=2: every pixel
    torch.testing.assert_close(maps.sum(dim=(-1, -2)), torch.ones(2, 2, 3))


def test_model_maps_use_image_coordinates() -> None:
    model = build_ccnet("ccnet_tiny", num_classes=3).eval()
    maps = ccnet_attention_maps(model, torch.randn(1, 3, 64, 48), [(0, 0), (63, 47)])
    assert maps.shape == (2, 1, 2, 8, 6)
    assert maps[0, 0, 0, 0, 0] > 0 and maps[0, 0, 1, 7, 5] > 0
    assert maps[0, 0, 0, 7, 5] == 0  # opposite corners share no row or column


def test_errors() -> None:
    with pytest.raises(ValueError, match="outside the 5x7 feature map"):
        criss_cross_attention_maps(CrissCrossAttention(16), torch.randn(1, 16, 5, 7), [(5, 0)])
    with pytest.raises(ValueError, match="criss-cross attention in its head"):
        ccnet_attention_maps(build_ccnet("nonlocal_tiny", 3).eval(), torch.randn(1, 3, 32, 32), [(0, 0)])
