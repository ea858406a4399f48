"""Backbones: feature sizes, the stem hook, and loading of torchvision / reference ImageNet state_dicts.

Oracles: literal feature sizes worked out by hand from the conv arithmetic, torchvision's own ResNet-50 (via
``IntermediateLayerGetter``), and an independent re-implementation of the CCNet authors' ResNet-101 below.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from ccnet.backbones import (
    BACKBONES,
    Backbone,
    PretrainedWeightsError,
    TinyBackbone,
    build_backbone,
    load_pretrained,
)

# Expected (h, w) of "aux"/"out" per (input size, output stride). torchvision stem: 7x7/2 conv then 3x3/2 pool
# (floor); deep stem: 3x3/2 conv then 3x3/2 pool in ceil mode; tiny: two 3x3/2 convs. Worked by hand, e.g.
# 64 -> 32 -> 16 -> 8 (torchvision), but 64 -> 32 -> 17 -> 9 (deep stem's ceil-mode pool).
_SIZES = {
    ((65, 65), 8): {"default": (9, 9), "resnet101_deepstem": (9, 9)},
    ((64, 80), 8): {"default": (8, 10), "resnet101_deepstem": (9, 11)},
    ((65, 65), 16): {"default": (5, 5), "resnet101_deepstem": (5, 5)},
    ((64, 80), 16): {"default": (4, 5), "resnet101_deepstem": (5, 6)},
}
_CHANNELS = {  # name -> (stem, aux, out)
    "resnet50": (64, 1024, 2048),
    "resnet101": (64, 1024, 2048),
    "resnet101_deepstem": (128, 1024, 2048),
    "tiny": (16, 64, 128),
    "efficientnet_lite0": (24, 112, 320),
    "efficientnet_lite1": (24, 112, 320),
    "efficientnet_lite2": (24, 120, 352),
}


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BN random affine parameters and running stats, so a mis-wired BN changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def _assert_features_close(actual: Tensor, expected: Tensor) -> None:
    # Random deep ResNets reach large magnitudes; compare relative to the largest value.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("input_size", [(65, 65), (64, 80)])
@pytest.mark.parametrize("name", BACKBONES)
def test_feature_sizes_and_channels(name: str, input_size: tuple[int, int], output_stride: int) -> None:
    # The ResNets run on the meta device (shapes only) to keep this CPU suite fast; their numerics are
    # checked against torchvision / the reference below, and "tiny" runs for real here.
    device = torch.device("cpu" if name == "tiny" else "meta")
    with device:
        backbone = build_backbone(name, output_stride=output_stride).eval()
    sizes = _SIZES[(input_size, output_stride)]
    expected_hw = sizes.get(name, sizes["default"])
    stem, aux, out = _CHANNELS[name]

    with torch.no_grad():
        features = backbone(torch.randn(1, 3, *input_size, device=device))

    assert set(features) == {"aux", "out"}
    assert features["aux"].shape == (1, aux, *expected_hw)
    assert features["out"].shape == (1, out, *expected_hw)
    assert (backbone.stem_channels, backbone.aux_channels, backbone.out_channels) == (stem, aux, out)
    assert backbone.output_stride == output_stride
    assert isinstance(backbone, Backbone)


# resnet101 shares resnet50's code path (TorchvisionResNet); left out to save CPU time.
@pytest.mark.parametrize("name", ["resnet50", "resnet101_deepstem", "tiny"])
def test_stem_hook_output_feeds_the_deep_stages(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    calls: list[tuple[int, ...]] = []

    def zero_hook(stem_features: Tensor) -> Tensor:
        calls.append(tuple(stem_features.shape))
        return torch.zeros_like(stem_features)

    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        hooked = backbone(x, stem_hook=zero_hook)
        # What the deep stages give for all-zero stem features, computed stage by stage.
        zeros = torch.zeros(1, _CHANNELS[name][0], 9, 11)
        aux = backbone.layer3(backbone.layer2(backbone.layer1(zeros)))
        out = backbone.layer4(aux)

    # 33 x 41 -> 17 x 21 (first stride-2 op) -> 9 x 11 (second) for every stem.
    assert calls == [(1, _CHANNELS[name][0], 9, 11)]
    torch.testing.assert_close(hooked["aux"], aux)
    torch.testing.assert_close(hooked["out"], out)


@pytest.fixture(scope="module")
def torchvision_resnet50_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A random torchvision ResNet-50 (dilated for output stride 8) and its state_dict file, fc included."""
    torch.manual_seed(1)
    model = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    _randomize_batchnorm(model, seed=1)
    path = tmp_path_factory.mktemp("weights") / "resnet50_imagenet.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_resnet50_loads_torchvision_state_dict(torchvision_resnet50_file: tuple[Path, nn.Module]) -> None:
    path, reference = torchvision_resnet50_file
    assert any(k.startswith("fc.") for k in torch.load(path, weights_only=True))
    backbone = build_backbone("resnet50", pretrained=path).eval()
    getter = IntermediateLayerGetter(reference, return_layers={"layer3": "aux", "layer4": "out"})

    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        actual, expected = backbone(x), getter(x)

    _assert_features_close(actual["aux"], expected["aux"])
    _assert_features_close(actual["out"], expected["out"])


def test_resnet50_file_into_resnet101_names_file_and_missing_keys(
    torchvision_resnet50_file: tuple[Path, nn.Module],
) -> None:
    path, _ = torchvision_resnet50_file
    with pytest.raises(PretrainedWeightsError) as info:
        build_backbone("resnet101", pretrained=path)
    message = str(info.value)
    assert str(path) in message
    # ResNet-101's layer3 has 23 blocks, ResNet-50's 6: blocks 6..22 are missing: 17 x 15 tensors
    # (3 conv weights, 3 BNs x 4; num_batches_tracked counters are not required).
    assert "255 missing keys" in message
    assert "layer3.6.conv1.weight" in message
    assert "unexpected" not in message
    assert "more" in message  # only the first keys are listed


# --- An independent re-implementation of the CCNet authors' ResNet (speedinghzl/CCNet, networks/ccnet.py),
# written from the reference file rather than from ccnet.backbones: own bottleneck, own layer builder.


class _RefBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + residual)


class _RefResNet101(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inplanes = 128
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 23, stride=1, dilation=2)
        self.layer4 = self._make_layer(512, 3, stride=1, dilation=4)
        self.fc = nn.Linear(2048, 1000)  # the ImageNet classifier, present in the reference's weights file

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        layers = [_RefBottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        layers += [_RefBottleneck(self.inplanes, planes, 1, dilation, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = self.layer2(self.layer1(self.maxpool(x)))
        aux = self.layer3(x)
        return {"aux": aux, "out": self.layer4(aux)}


def test_deepstem_loads_reference_state_dict_and_matches_it(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = _RefResNet101()
    _randomize_batchnorm(reference, seed=2)
    path = tmp_path / "resnet101-imagenet.pth"
    torch.save(reference.state_dict(), path)

    backbone = build_backbone("resnet101_deepstem", pretrained=path).eval()
    # 32 x 40 -> 16 x 20 -> 9 x 11 with the ceil-mode pool (8 x 10 in floor mode) -> 5 x 6.
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        actual, expected = backbone(x), reference.eval()(x)

    assert actual["out"].shape == (1, 2048, 5, 6)

    _assert_features_close(actual["aux"], expected["aux"])
    _assert_features_close(actual["out"], expected["out"])


@pytest.mark.parametrize(
    ("output_stride", "layer3_stride", "layer3_dilation", "layer4_dilation"), [(8, 1, 2, 4), (16, 2, 1, 2)]
)
def test_deepstem_dilates_every_block(
    output_stride: int, layer3_stride: int, layer3_dilation: int, layer4_dilation: int
) -> None:
    with torch.device("meta"):  # structure only: no memory, no init cost
        backbone = build_backbone("resnet101_deepstem", output_stride=output_stride)
    layer3, layer4 = list(backbone.layer3), list(backbone.layer4)
    assert (len(layer3), len(layer4)) == (23, 3)
    assert [b.conv2.dilation for b in layer3] == [(layer3_dilation,) * 2] * 23
    assert [b.conv2.padding for b in layer3] == [(layer3_dilation,) * 2] * 23
    assert [b.conv2.dilation for b in layer4] == [(layer4_dilation,) * 2] * 3
    assert [b.conv2.padding for b in layer4] == [(layer4_dilation,) * 2] * 3
    assert layer3[0].conv2.stride == (layer3_stride,) * 2
    assert layer4[0].conv2.stride == (1, 1)


# --- Loader behaviour on the cheap tiny backbone.


def test_nested_prefixed_state_dict_without_counters_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(3)
    source = build_backbone("tiny")
    _randomize_batchnorm(source, seed=3)
    state = {
        f"module.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    for nesting in ("state_dict", "model"):
        path = tmp_path / f"{nesting}.pth"
        torch.save({nesting: state, "epoch": torch.tensor(90)}, path)
        target = build_backbone("tiny")
        with caplog.at_level(logging.INFO, logger="ccnet.backbones"):
            load_pretrained(target, path)

        for key, value in source.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)
        assert f"loaded {len(state)} tensors from {path}" in caplog.text


def test_missing_and_unexpected_keys_are_listed_with_the_file(tmp_path: Path) -> None:
    state = build_backbone("tiny").state_dict()
    del state["layer4.bn2.running_var"]
    state["head.classifier.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(1000, 128)  # ignored: the ImageNet classifier
    path = tmp_path / "extra.pth"
    torch.save(state, path)

    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(build_backbone("tiny"), path)
    message = str(info.value)
    assert str(path) in message
    assert "1 missing keys: layer4.bn2.running_var" in message
    assert "1 unexpected keys: head.classifier.weight" in message
    assert "fc.weight" not in message


def test_shape_mismatch_is_listed(tmp_path: Path) -> None:
    path = tmp_path / "narrow.pth"
    torch.save(TinyBackbone(widths=(8, 16, 32, 64), stem_channels=8).state_dict(), path)
    target = TinyBackbone()
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(PretrainedWeightsError, match="shape mismatches") as info:
        load_pretrained(target, path)
    assert "stem.0.0.weight (file (8, 3, 3, 3), model (16, 3, 3, 3))" in str(info.value)
    assert str(path) in str(info.value)
    # A rejected file leaves the backbone untouched.
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_missing_unreadable_or_non_state_dict_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist.pth"
    with pytest.raises(PretrainedWeightsError, match="does_not_exist.pth"):
        build_backbone("tiny", pretrained=missing)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="garbage.pth"):
        build_backbone("tiny", pretrained=str(garbage))

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(PretrainedWeightsError, match="list.pth"):
        build_backbone("tiny", pretrained=not_a_state_dict)


def test_pretrained_weights_error_is_a_value_error() -> None:
    assert issubclass(PretrainedWeightsError, ValueError)


def test_unknown_name_and_output_stride_raise() -> None:
    with pytest.raises(ValueError, match="resnet101_deepstem") as info:
        build_backbone("resnet18")
    assert "resnet18" in str(info.value)
    with pytest.raises(ValueError, match="32"):
        build_backbone("tiny", output_stride=32)
    with pytest.raises(ValueError, match="4"):
        TinyBackbone(output_stride=4)


def test_tiny_is_small_trainable_and_configurable() -> None:
    backbone = build_backbone("tiny")
    assert sum(p.numel() for p in backbone.parameters()) < 500_000

    features = backbone(torch.randn(2, 3, 64, 64))
    (features["aux"].sum() + features["out"].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())

    narrow = TinyBackbone(widths=(8, 8, 16, 24), stem_channels=4)
    assert (narrow.stem_channels, narrow.aux_channels, narrow.out_channels) == (4, 16, 24)
    out = narrow(torch.randn(1, 3, 64, 64))
    assert out["aux"].shape == (1, 16, 8, 8)
    assert out["out"].shape == (1, 24, 8, 8)
