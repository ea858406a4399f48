"""The effective receptive field against models whose reach is known by construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ccnet import CrissCrossAttention, RecurrentAttention, build_ccnet
from ccnet.receptive import effective_receptive_field


def _convs(layers: int) -> nn.Module:
    """``layers`` 3x3 convolutions: a (2 layers + 1)-pixel square of reach, nothing beyond."""
    torch.manual_seed(0)
    return nn.Sequential(
        *(nn.Conv2d(3, 3, 3, padding=1) for _ in range(layers - 1)), nn.Conv2d(3, 4, 3, padding=1)
    )


def test_a_3x3_convolution_decides_from_its_3x3_neighbourhood_alone() -> None:
    field = effective_receptive_field(_convs(1), torch.randn(2, 3, 15, 15))
    assert field.probes == 2 and field.mass.sum().item() == pytest.approx(1.0)
    # Distances 0, 1 and sqrt(2) = 1.41: everything below 2 pixels, nothing beyond.
    assert field.radius(1.0) == 2.0 and field.share_beyond(2.0) == 0.0
    assert 0.0 < field.mass[0].item() < 1.0 and field.share_beyond(1.0) > 0.0


def test_two_convolutions_reach_twice_as_far() -> None:
    field = effective_receptive_field(_convs(2), torch.randn(2, 3, 15, 15), points=[(7, 7), (3, 10)])
    assert field.probes == 4
    assert field.radius(1.0) == 3.0  # a 5x5 square: its corners 2.83 away
    assert field.share_beyond(2.0) > 0.0 and field.share_beyond(3.0) == 0.0


class _GlobalMean(nn.Module):
    """Every pixel's logits are a linear map of the image's mean colour: each input pixel weighs the same."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.linear(x.mean((2, 3)))  # (B, K)
        return {"out": logits[:, :, None, None].expand(-1, -1, *x.shape[-2:])}


def test_a_global_model_spreads_the_mass_as_the_pixels_lie() -> None:
    torch.manual_seed(0)
    height, width, point = 9, 12, (2, 3)
    field = effective_receptive_field(_GlobalMean(), torch.randn(3, 3, height, width), points=[point])
    # Equal gradients everywhere: the share beyond d is the share of pixels at distance >= d, by counting.
    distances = [math.dist(point, (r, c)) for r in range(height) for c in range(width)]
    for d in (1, 3, 5, 8):
        expected = sum(int(x) >= d for x in distances) / len(distances)
        assert field.share_beyond(d) == pytest.approx(expected)
    assert field.radius(1.0) == int(max(distances)) + 1


def test_criss_cross_attention_reaches_its_row_and_column_and_r2_everything() -> None:
    torch.manual_seed(0)
    channels, size = 16, 11
    images = torch.randn(1, 3, size, size)
    lift = nn.Conv2d(3, channels, 1)
    classify = nn.Conv2d(channels, 4, 1)
    for recurrence in (1, 2):
        attention = CrissCrossAttention(channels)
        nn.init.constant_(attention.gamma, 1.0)
        model = nn.Sequential(lift, RecurrentAttention(attention, recurrence), classify)
        field = effective_receptive_field(model, images, points=[(5, 5)])
        # R=1 reaches the cross only, whose farthest pixels are 5 away; R=2 also the corners, 7.07 away.
        assert field.share_beyond(5.0) > 0.0
        assert (field.share_beyond(6.0) > 0.0) == (recurrence == 2)
        assert (field.share_beyond(7.0) > 0.0) == (recurrence == 2)
    without = nn.Sequential(lift, classify)  # no attention: 1x1 convolutions see their own pixel only
    assert effective_receptive_field(without, images).radius(1.0) == 1.0


def test_a_ccnet_is_probed_through_its_output_dict() -> None:
    torch.manual_seed(0)
    model = build_ccnet("ccnet_tiny", 5).eval()
    field = effective_receptive_field(model, torch.randn(2, 3, 64, 64))
    assert field.probes == 2 and 1.0 <= field.radius(0.5) <= field.radius(0.95) <= 91.0


def test_bad_arguments_are_refused() -> None:
    images = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="expected images"):
        effective_receptive_field(_convs(1), images[0])
    with pytest.raises(ValueError, match=r"point \(8, 0\) is outside the 8x8 images"):
        effective_receptive_field(_convs(1), images, points=[(8, 0)])
    with pytest.raises(ValueError, match="share must be in"):
        effective_receptive_field(_convs(1), images).radius(0.0)
    constant = nn.Conv2d(3, 4, 1)
    nn.init.zeros_(constant.weight)
    with pytest.raises(ValueError, match="do not depend on the input"):
        effective_receptive_field(constant, images)
