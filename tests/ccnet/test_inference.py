"""Whole-image, sliding-window and multi-scale prediction against explicitly computed expectations."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccnet.inference import predict_multiscale, predict_sliding, predict_whole

NUM_CLASSES = 4


class PerPixel(nn.Module):
    """1x1 conv: each output pixel depends on its input pixel only, so any tiling gives the same result."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.conv(x)
        return {"out": out, "aux": torch.zeros_like(out)}


class GlobalMean(PerPixel):
    """Adds the per-image mean before the conv: the output depends on the whole (window) content."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.conv(x + 4 * x.mean(dim=(2, 3), keepdim=True))}


class XRamp(PerPixel):
    """Adds a class-dependent ramp over the column index: not equivariant to a horizontal flip."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        ramp = torch.linspace(-2.0, 2.0, x.shape[-1])  # (W,)
        slopes = torch.arange(self.conv.out_channels, dtype=torch.float32) - 1.5  # (K,)
        return {"out": self.conv(x) + slopes.view(1, -1, 1, 1) * ramp.view(1, 1, 1, -1)}


class WindowCorner(nn.Module):
    """Reads its window's top-left (row, column) from a coordinate image and records it.

    Logits are (0, 0.1 * left + 0.3 * top) everywhere in the window, so P(class 1) identifies the window.
    """

    def __init__(self) -> None:
        super().__init__()
        self.corners: list[tuple[int, int]] = []

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        top, left = x[0, 1, 0, 0].item(), x[0, 0, 0, 0].item()
        self.corners.append((int(top), int(left)))
        batch, _, height, width = x.shape
        logits = torch.zeros(batch, 2, height, width)
        logits[:, 1] = 0.1 * left + 0.3 * top
        return {"out": logits}


def coordinate_image(height: int, width: int) -> Tensor:
    """(1, 3, H, W): channel 0 holds the column index, channel 1 the row index, channel 2 zeros."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([cols, rows, torch.zeros_like(rows)]).float().unsqueeze(0)


def random_image(height: int, width: int, batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("crop_size, stride", [(8, 5), ((6, 8), (4, 5))])
@pytest.mark.parametrize("size", [(5, 6), (8, 8), (6, 8), (13, 19), (5, 19), (17, 7)])
def test_sliding_equals_whole_for_per_pixel_model(
    size: tuple[int, int], crop_size: int | tuple[int, int], stride: int | tuple[int, int]
) -> None:
    model = PerPixel().eval()
    image = random_image(*size)
    sliding = predict_sliding(model, image, crop_size, stride, NUM_CLASSES)
    assert sliding.shape == (2, NUM_CLASSES, *size)
    torch.testing.assert_close(sliding, predict_whole(model, image), atol=1e-6, rtol=0)


def test_sliding_differs_for_non_local_model() -> None:
    model = GlobalMean().eval()
    image = random_image(13, 19)
    difference = predict_sliding(model, image, 8, 5, NUM_CLASSES) - predict_whole(model, image)
    assert difference.abs().max() > 1e-2


def test_small_image_is_zero_padded_to_the_crop() -> None:
    # The non-local model sees the padding, so the result is the padded image's prediction, cropped.
    model = GlobalMean().eval()
    image = random_image(5, 6)
    expected = predict_whole(model, F.pad(image, (0, 2, 0, 3)))[:, :, :5, :6]
    torch.testing.assert_close(predict_sliding(model, image, 8, 5, NUM_CLASSES), expected, atol=1e-6, rtol=0)


def test_windows_cover_every_pixel_and_overlaps_are_averaged() -> None:
    # H = 6, crop 4, stride 3: rows [0, 4) and [2, 6) (the second shifted back from 3 to end at the border).
    # W = 11, crop 4, stride 3: columns [0, 4), [3, 7), [6, 10) and [7, 11) (shifted back from 9).
    model = WindowCorner()
    probs = predict_sliding(model, coordinate_image(6, 11), (4, 4), (3, 3), num_classes=2)
    assert sorted(model.corners) == [(top, left) for top in (0, 2) for left in (0, 3, 6, 7)]

    tops_covering_row = [[0], [0], [0, 2], [0, 2], [2], [2]]
    lefts_covering_col = [[0], [0], [0], [0, 3], [3], [3], [3, 6], [6, 7], [6, 7], [6, 7], [7]]
    expected = torch.tensor(
        [
            [
                torch.tensor([0.1 * left + 0.3 * top for top in tops for left in lefts]).sigmoid().mean()
                for lefts in lefts_covering_col
            ]
            for tops in tops_covering_row
        ]
    )
    torch.testing.assert_close(probs[0, 1], expected, atol=1e-6, rtol=0)


def test_reference_protocol_window_layout() -> None:
    # Cityscapes 1024 x 2048 with crop 769, stride 513: 2 rows x 4 columns of windows, last ones shifted back.
    model = WindowCorner()
    probs = predict_sliding(model, coordinate_image(1024, 2048), 769, 513, num_classes=2)
    assert probs.shape == (1, 2, 1024, 2048)
    assert sorted(model.corners) == [(top, left) for top in (0, 255) for left in (0, 513, 1026, 1279)]


def test_multiscale_at_scale_one_without_flip_is_a_single_pass() -> None:
    model = PerPixel().eval()
    image = random_image(13, 19)
    torch.testing.assert_close(
        predict_multiscale(model, image), predict_whole(model, image), atol=1e-6, rtol=0
    )
    global_model = GlobalMean().eval()
    torch.testing.assert_close(
        predict_multiscale(global_model, image, mode="slide", crop_size=8, stride=5, num_classes=NUM_CLASSES),
        predict_sliding(global_model, image, 8, 5, NUM_CLASSES),
        atol=1e-6,
        rtol=0,
    )


def test_flip_changes_nothing_for_a_flip_equivariant_model() -> None:
    model = PerPixel().eval()
    image = random_image(9, 14)
    torch.testing.assert_close(
        predict_multiscale(model, image, flip=True), predict_multiscale(model, image), atol=1e-6, rtol=0
    )


def test_flipped_pass_is_flipped_back() -> None:
    model = XRamp().eval()
    image = random_image(9, 14)
    with torch.no_grad():
        straight = model(image)["out"].softmax(dim=1)
        mirrored = model(image.flip(-1))["out"].softmax(dim=1)
    expected = (straight + mirrored.flip(-1)) / 2
    # The model is position-dependent: forgetting the flip-back, or the flip, gives another answer.
    assert ((straight + mirrored) / 2 - expected).abs().max() > 1e-2
    assert (straight - expected).abs().max() > 1e-2
    torch.testing.assert_close(predict_multiscale(model, image, flip=True), expected, atol=1e-6, rtol=0)


def test_scales_are_resized_back_and_averaged() -> None:
    model = XRamp().eval()
    image = random_image(8, 12)
    with torch.no_grad():
        full = model(image)["out"].softmax(dim=1)
        half_image = F.interpolate(image, size=(4, 6), mode="bilinear", align_corners=False)
        half = model(half_image)["out"].softmax(dim=1)
    half = F.interpolate(half, size=(8, 12), mode="bilinear", align_corners=False)
    assert (half - full).abs().max() > 1e-2
    torch.testing.assert_close(
        predict_multiscale(model, image, scales=(0.5, 1.0)), (half + full) / 2, atol=1e-6, rtol=0
    )


def test_whole_upsamples_a_smaller_output() -> None:
    class Strided(PerPixel):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"out": self.conv(F.avg_pool2d(x, 2))}

    model = Strided().eval()
    image = random_image(8, 10)
    with torch.no_grad():
        logits = model(image)["out"]  # (2, K, 4, 5)
    expected = F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=False).softmax(dim=1)
    torch.testing.assert_close(predict_whole(model, image), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "predict",
    [
        lambda model, image: predict_whole(model, image),
        lambda model, image: predict_sliding(model, image, (8, 6), (5, 4), NUM_CLASSES),
        lambda model, image: predict_multiscale(model, image, (0.75, 1.25), True, "slide", 8, 5, NUM_CLASSES),
    ],
    ids=["whole", "sliding", "multiscale"],
)
def test_probabilities_sum_to_one(predict: Callable[[nn.Module, Tensor], Tensor]) -> None:
    model = XRamp().eval()
    image = random_image(13, 19)
    probs = predict(model, image)
    assert probs.shape == (2, NUM_CLASSES, 13, 19) and probs.dtype == torch.float32
    assert probs.min() >= 0
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 13, 19), atol=1e-5, rtol=0)


def test_model_mode_is_left_to_the_caller() -> None:
    model = PerPixel().train()
    probs = predict_whole(model, random_image(4, 4))
    assert model.training and not probs.requires_grad


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"scales": ()}, "scales"),
        ({"scales": (1.0, 0.0)}, "scales"),
        ({"scales": (-0.5,)}, "scales"),
        ({"mode": "tiles"}, "mode"),
        ({"mode": "slide", "stride": 5, "num_classes": NUM_CLASSES}, "crop_size"),
        ({"mode": "slide", "crop_size": 8, "num_classes": NUM_CLASSES}, "stride"),
        ({"mode": "slide", "crop_size": 8, "stride": 5}, "num_classes"),
        ({"mode": "slide", "crop_size": 8, "stride": 9, "num_classes": NUM_CLASSES}, "stride"),
        ({"mode": "slide", "crop_size": 0, "stride": 1, "num_classes": NUM_CLASSES}, "crop_size"),
        ({"mode": "slide", "crop_size": 8, "stride": 5, "num_classes": NUM_CLASSES + 1}, "classes"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        predict_multiscale(PerPixel().eval(), random_image(9, 9), **kwargs)
