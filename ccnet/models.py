"""CCNet and its variants, built by name.

Every model is a :class:`CCNet` configured by a :class:`CCNetConfig`; the registry holds one config per
self-describing name (``{method}_{backbone}``), and :func:`build_ccnet` applies keyword overrides::

    model = build_ccnet("ccnet_r101_deepstem_d8", num_classes=19)             # the paper's model
    model = build_ccnet("ccnet_tiny", num_classes=4, recurrence=1)            # CPU demo, R=1
    model = build_ccnet("ccnet_r50_d8", num_classes=150, placement="both")    # attention also at stride 4
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ccnet.attention import ATTENTION_TYPES, IMPLEMENTATIONS
from ccnet.backbones import BACKBONES, Normalization, build_backbone
from ccnet.heads import FCNHead, RCCAHead, build_recurrent_attention

PLACEMENTS = ("head", "stem", "both")


@dataclass(frozen=True)
class CCNetConfig:
    """Everything that defines a CCNet model. Defaults: the paper's Cityscapes model (but ``align_corners``).

    Attributes:
        backbone: one of :data:`ccnet.backbones.BACKBONES`.
        num_classes: number of output classes.
        attention: ``"criss_cross"`` (RCCA), ``"axial"`` (rows then columns) or ``"nonlocal"``.
        recurrence: shared-weight attention steps R (0 = plain dilated FCN).
        placement: where attention goes: ``"head"`` (after the backbone, the paper's), ``"stem"`` (on the
            stem's stride-4 features, before the deep stages) or ``"both"``.
        reduction: query/key channels are the attention width divided by this.
        head_channels: width of the head's attention (the 3x3 reduce conv's output).
        bottleneck_channels: width of the 3x3 conv after concatenating backbone and context features.
        aux_channels: width of the auxiliary FCN head; 0 turns the aux head off.
        dropout: Dropout2d before both classifiers.
        embedding_channels: > 0 adds the projection used by the category-consistent loss.
        output_stride: 8 (the paper's) or 16.
        align_corners: how the logits are upsampled to the input size (and, in :mod:`ccnet.inference`, how
            images and logits are rescaled). True is the authors' code and mmseg's/PaddleSeg's 769x769
            recipes: with crops of 8k + 1 pixels, feature pixel i sits exactly on input pixel 8i. False (the
            default) is torchvision's and mmseg's general convention; it stays the default because the weights
            learn the geometry they were trained with, so every checkpoint saved before this option existed
            (all trained with False) keeps predicting as trained. Recipes set it: the 769x769 configs to True.
        pretrained: local file with ImageNet backbone weights, or None; never downloaded.
        impl: how the attention modules compute (same results): ``auto`` (Triton kernels on CUDA when
            installed, else the lean backward), ``triton``, ``lean`` or ``autograd``; see ``ccnet.attention``.
        gamma_init: every attention module's residual scale ``gamma`` at initialisation. 0 (the paper's)
            makes each module the identity at first, which keeps a pretrained network's features intact where
            attention is inserted into it, but while ``gamma`` is 0 the attention's query/key/value convs get
            no gradient: only ``gamma`` learns at first, and on short schedules it barely leaves 0. In the
            head, which is trained from random weights anyway, a non-zero start lets every attention weight
            learn from the first step.
    """

    backbone: str = "resnet101_deepstem"
    num_classes: int = 19
    attention: str = "criss_cross"
    recurrence: int = 2
    placement: str = "head"
    reduction: int = 8
    head_channels: int = 512
    bottleneck_channels: int = 512
    aux_channels: int = 512
    dropout: float = 0.1
    embedding_channels: int = 0
    output_stride: int = 8
    align_corners: bool = False
    pretrained: str | None = None
    impl: str = "auto"
    gamma_init: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "backbone": self.backbone in BACKBONES,
            "attention": self.attention in ATTENTION_TYPES,
            "placement": self.placement in PLACEMENTS,
            "num_classes": self.num_classes >= 1,
            "recurrence": self.recurrence >= 0,
            "reduction": self.reduction >= 1,
            "head_channels": self.head_channels >= self.reduction,
            "bottleneck_channels": self.bottleneck_channels >= 1,
            "aux_channels": self.aux_channels >= 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "embedding_channels": self.embedding_channels >= 0,
            "output_stride": self.output_stride in (8, 16),
            "gamma_init": math.isfinite(self.gamma_init),
        }
        choices = {
            "backbone": BACKBONES,
            "attention": tuple(ATTENTION_TYPES),
            "placement": PLACEMENTS,
            "impl": IMPLEMENTATIONS,
        }
        checks["impl"] = self.impl in IMPLEMENTATIONS
        for key, ok in checks.items():
            if not ok:
                hint = f"; choose one of {list(choices[key])}" if key in choices else ""
                raise ValueError(f"invalid model config: {key}={getattr(self, key)!r}{hint}")
        implementations = ATTENTION_TYPES[self.attention].IMPLS
        if self.impl not in implementations:
            raise ValueError(
                f"invalid model config: impl={self.impl!r} with attention={self.attention!r}; "
                f"choose one of {list(implementations)}"
            )


class CCNet(nn.Module):
    """Dilated backbone -> RCCA head (+ auxiliary FCN head on stage 3).

    ``forward(image (B, 3, H, W))`` returns ``{"out": logits (B, K, H, W)}``, plus ``"aux"`` (same shape)
    when the aux head is on and ``"embedding"`` (B, E, H/8, W/8) when ``embedding_channels > 0``. Logits
    are upsampled bilinearly (with ``config.align_corners``) to the input size; the losses (aux weight 0.4)
    live in :mod:`ccnet.losses`.
    """

    def __init__(self, config: CCNetConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(
            config.backbone, output_stride=config.output_stride, pretrained=config.pretrained
        )
        use_stem = config.placement in ("stem", "both")
        use_head = config.placement in ("head", "both")
        self.stem_attention = (
            build_recurrent_attention(
                config.attention,
                self.backbone.stem_channels,
                config.recurrence,
                config.reduction,
                config.impl,
                stream="stem_attention",
                gamma_init=config.gamma_init,
            )
            if use_stem
            else None
        )
        self.head = RCCAHead(
            self.backbone.out_channels,
            config.num_classes,
            channels=config.head_channels,
            bottleneck_channels=config.bottleneck_channels,
            attention=config.attention,
            recurrence=config.recurrence if use_head else 0,
            reduction=config.reduction,
            dropout=config.dropout,
            embedding_channels=config.embedding_channels,
            impl=config.impl,
            gamma_init=config.gamma_init,
        )
        self.aux_head = (
            FCNHead(self.backbone.aux_channels, config.num_classes, config.aux_channels, config.dropout)
            if config.aux_channels > 0
            else None
        )

    @property
    def normalization(self) -> Normalization:
        """The ``(image - mean) / std`` of [0, 1] RGB images that the backbone's weights expect."""
        return self.backbone.normalization

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        size = image.shape[-2:]
        features = self.backbone(image, stem_hook=self.stem_attention)
        outputs = self.head(features["out"])
        corners = self.config.align_corners
        outputs["out"] = F.interpolate(outputs["out"], size=size, mode="bilinear", align_corners=corners)
        if self.aux_head is not None:
            aux = self.aux_head(features["aux"])
            outputs["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=corners)
        return outputs


_BACKBONE_SUFFIXES: dict[str, dict[str, Any]] = {
    "r50_d8": dict(backbone="resnet50"),
    "r101_d8": dict(backbone="resnet101"),
    "r101_deepstem_d8": dict(backbone="resnet101_deepstem"),
    # The tiny backbone's stage widths are (16, 32, 64, 128): a head of 64 keeps the proportions.
    "tiny": dict(backbone="tiny", head_channels=64, bottleneck_channels=64, aux_channels=32),
    # EfficientNet-Lite ends in 320 (lite0/1) or 352 (lite2) channels: a head of 256 is about its width.
    # d16 is the one that trains on a CPU: its dilated depthwise convs at stride 8 cost ~4-7x more there.
    **{
        f"lite{n}_d{stride}": dict(
            backbone=f"efficientnet_lite{n}",
            output_stride=stride,
            head_channels=256,
            bottleneck_channels=256,
            aux_channels=128,
        )
        for n in (0, 1, 2)
        for stride in (8, 16)
    },
}
_METHODS: dict[str, dict[str, Any]] = {
    "ccnet": dict(attention="criss_cross", recurrence=2),
    "axial": dict(attention="axial", recurrence=1),
    "nonlocal": dict(attention="nonlocal", recurrence=1),
    "fcn": dict(recurrence=0),
}
_REGISTRY: dict[str, CCNetConfig] = {
    f"{method}_{suffix}": CCNetConfig(**method_fields, **backbone_fields)
    for method, method_fields in _METHODS.items()
    for suffix, backbone_fields in _BACKBONE_SUFFIXES.items()
}


def list_models() -> list[str]:
    """Names accepted by :func:`build_ccnet`, sorted."""
    return sorted(_REGISTRY)


def model_config(name: str, **overrides: Any) -> CCNetConfig:
    """The registered config of ``name`` with ``overrides`` applied (validated)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    fields = {field.name for field in dataclasses.fields(CCNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown option(s) for model {name!r}: {unknown}; valid options: {sorted(fields)}")
    return dataclasses.replace(_REGISTRY[name], **overrides)


def build_ccnet(name: str, num_classes: int, **overrides: object) -> CCNet:
    """Build a registered model (see :func:`list_models`) for ``num_classes`` classes.

    Args:
        name: registered name, e.g. ``"ccnet_r101_deepstem_d8"``, ``"nonlocal_r50_d8"``, ``"ccnet_tiny"``.
        num_classes: number of output classes.
        **overrides: any :class:`CCNetConfig` field, e.g. ``recurrence=3``, ``placement="both"``,
            ``pretrained="/path/resnet101.pth"``.

    Raises:
        ValueError: unknown name or invalid value (the message names the field).
        TypeError: an override that is not a config field.
    """
    return CCNet(model_config(name, num_classes=num_classes, **overrides))
