"""Whole-image, sliding-window and multi-scale prediction against explicitly computed expectations.

The default fusion is the authors' (``evaluate.py`` of speedinghzl/CCNet): windows, scales and flips average
logits and the softmax comes last; ``fusion="probs"`` averages probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

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


def _window_oracle(fusion: str) -> Tensor:
    """P(class 1) of :class:`WindowCorner` on a 6 x 11 image, windows 4 x 4 every 3 pixels, by hand.

    H = 6: rows [0, 4) and [2, 6) (the second shifted back from 3 to end at the border). W = 11: columns
    [0, 4), [3, 7), [6, 10) and [7, 11) (shifted back from 9). A window's logits are (0, z) with
    z = 0.1 * left + 0.3 * top, so its P(class 1) is sigmoid(z).
    """
    tops_covering_row = [[0], [0], [0, 2], [0, 2], [2], [2]]
    lefts_covering_col = [[0], [0], [0], [0, 3], [3], [3], [3, 6], [6, 7], [6, 7], [6, 7], [7]]

    def fuse(z: Tensor) -> Tensor:  # the logits z of the windows covering one pixel
        return z.mean().sigmoid() if fusion == "logits" else z.sigmoid().mean()

    return torch.tensor(
        [
            [
                fuse(torch.tensor([0.1 * left + 0.3 * top for top in tops for left in lefts]))
                for lefts in lefts_covering_col
            ]
            for tops in tops_covering_row
        ]
    )


@pytest.mark.parametrize("fusion", ["default", "logits", "probs"])
def test_windows_cover_every_pixel_and_overlaps_are_averaged(fusion: str) -> None:
    model = WindowCorner()
    kwargs = {} if fusion == "default" else {"fusion": fusion}
    probs = predict_sliding(model, coordinate_image(6, 11), (4, 4), (3, 3), num_classes=2, **kwargs)
    assert sorted(model.corners) == [(top, left) for top in (0, 2) for left in (0, 3, 6, 7)]
    assert (_window_oracle("logits") - _window_oracle("probs")).abs().max() > 1e-3, "fusions must differ"
    expected = _window_oracle("logits" if fusion == "default" else fusion)  # the authors' by default
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
        straight = model(image)["out"]
        mirrored = model(image.flip(-1))["out"]
    expected = ((straight + mirrored.flip(-1)) / 2).softmax(dim=1)  # the authors': mean logits, then softmax
    # The model is position-dependent: forgetting the flip-back, or the flip, gives another answer.
    assert (((straight + mirrored) / 2).softmax(dim=1) - expected).abs().max() > 1e-2
    assert (straight.softmax(dim=1) - expected).abs().max() > 1e-2
    torch.testing.assert_close(predict_multiscale(model, image, flip=True), expected, atol=1e-6, rtol=0)


def test_flipped_pass_with_probability_fusion() -> None:
    model = XRamp().eval()
    image = random_image(9, 14)
    with torch.no_grad():
        straight = model(image)["out"].softmax(dim=1)
        mirrored = model(image.flip(-1))["out"].softmax(dim=1)
    expected = (straight + mirrored.flip(-1)) / 2
    logit_fused = predict_multiscale(model, image, flip=True, fusion="logits")
    assert (logit_fused - expected).abs().max() > 1e-3, "the two fusions must be told apart"
    torch.testing.assert_close(
        predict_multiscale(model, image, flip=True, fusion="probs"), expected, atol=1e-6, rtol=0
    )


def _two_scales(
    model: nn.Module, image: Tensor, align_corners: bool, fusion: str = "logits"
) -> tuple[Tensor, Tensor]:
    """Logits (or probabilities) of ``image`` (8 x 12) at scale 1 and at scale 0.5 resized back, by hand."""
    with torch.no_grad():
        full = model(image)["out"]
        half_image = F.interpolate(image, size=(4, 6), mode="bilinear", align_corners=align_corners)
        half = model(half_image)["out"]
    if fusion == "probs":  # each pass's probabilities, resized back
        full, half = full.softmax(dim=1), half.softmax(dim=1)
    half = F.interpolate(half, size=(8, 12), mode="bilinear", align_corners=align_corners)
    assert (half - full).abs().max() > 1e-2
    return full, half


def test_scales_are_resized_back_and_averaged() -> None:
    model = XRamp().eval()
    image = random_image(8, 12)
    full, half = _two_scales(model, image, align_corners=False)
    expected = ((half + full) / 2).softmax(dim=1)
    torch.testing.assert_close(
        predict_multiscale(model, image, scales=(0.5, 1.0)), expected, atol=1e-6, rtol=0
    )
    full_probs, half_probs = _two_scales(model, image, align_corners=False, fusion="probs")
    assert ((half_probs + full_probs) / 2 - expected).abs().max() > 1e-3, "the two fusions must be told apart"
    torch.testing.assert_close(
        predict_multiscale(model, image, scales=(0.5, 1.0), fusion="probs"),
        (half_probs + full_probs) / 2,
        atol=1e-6,
        rtol=0,
    )


class CornerAligned(XRamp):
    """An XRamp that says, as a CCNet does through its config, that it upsamples with align_corners=True."""

    config = SimpleNamespace(align_corners=True)


def test_rescaling_follows_the_models_align_corners() -> None:
    model = CornerAligned().eval()
    image = random_image(8, 12)
    full, half = _two_scales(model, image, align_corners=True)
    expected = ((half + full) / 2).softmax(dim=1)
    _, half_false = _two_scales(model, image, align_corners=False)
    assert (((half_false + full) / 2).softmax(dim=1) - expected).abs().max() > 1e-3
    torch.testing.assert_close(
        predict_multiscale(model, image, scales=(0.5, 1.0)), expected, atol=1e-6, rtol=0
    )
    # An explicit argument wins over the model's setting.
    torch.testing.assert_close(
        predict_multiscale(model, image, scales=(0.5, 1.0), align_corners=False),
        ((half_false + full) / 2).softmax(dim=1),
        atol=1e-6,
        rtol=0,
    )


def test_sliding_window_logits_are_resized_with_the_models_align_corners() -> None:
    class Strided(CornerAligned):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"out": self.conv(F.avg_pool2d(x, 2))}

    model = Strided().eval()
    image = random_image(8, 10)
    with torch.no_grad():
        logits = model(image)["out"]  # (2, K, 4, 5)
    expected = F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=True).softmax(dim=1)
    other = F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=False).softmax(dim=1)
    assert (expected - other).abs().max() > 1e-3
    torch.testing.assert_close(predict_whole(model, image), expected, atol=1e-6, rtol=0)
    # One window covering the image: the sliding path resizes the same way.
    torch.testing.assert_close(
        predict_sliding(model, image, (8, 10), (8, 10), NUM_CLASSES), expected, atol=1e-6, rtol=0
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
        lambda model, image: predict_multiscale(
            model, image, (0.75, 1.25), True, "slide", 8, 5, NUM_CLASSES, fusion="probs"
        ),
    ],
    ids=["whole", "sliding", "multiscale", "multiscale-probs"],
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
        ({"fusion": "votes"}, "fusion"),
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
