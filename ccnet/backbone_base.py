"""What every backbone is: the :class:`Backbone` contract and the input normalisation its weights expect.

A backbone is a stride-4 stem, then four stages ``layer1``..``layer4`` (strides 4, 8, 8, 8 at output stride
8; 4, 8, 16, 16 at output stride 16, the lost stride replaced by dilation). ``forward`` returns
``{"aux": layer3 features, "out": layer4 features}`` like torchvision's ``IntermediateLayerGetter``, and can
apply a hook to the stem output (to place an attention module before the deep stages).

Each backbone class names the :class:`Normalization` of its images (timm's ``pretrained_cfg`` mean/std):
the training transforms, evaluation, ``ccnet predict`` and every checkpoint take it from the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

OUTPUT_STRIDES: tuple[int, ...] = (8, 16)


class PretrainedWeightsError(ValueError):
    """Pretrained weights are unavailable, unreadable or do not match the backbone key for key."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(image - mean) / std`` of the [0, 1] RGB image that a backbone's weights expect."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict[str, list[float]]:
        """``{"mean": [...], "std": [...]}``, as saved in checkpoints."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: Mapping[str, list[float]]) -> Normalization:
        return cls(_rgb(values["mean"]), _rgb(values["std"]))


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    """A saved mean or std; ValueError unless it has exactly three values."""
    red, green, blue = (float(v) for v in values)
    return red, green, blue


# torchvision's ImageNet statistics (its ResNet weights, the CCNet authors' ResNet-101).
IMAGENET_NORMALIZATION = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The TF EfficientNet-Lite weights: (x - 127) / 128 on 0..255, i.e. [-1, 1] (timm's tf_efficientnet_lite*).
SYMMETRIC_NORMALIZATION = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def check_output_stride(output_stride: int) -> None:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")


class Backbone(nn.Module):
    """Base class: a stride-4 stem followed by four stages ``layer1``..``layer4``.

    Subclasses define ``forward_stem`` and the modules ``layer1``..``layer4``, and set the channel counts.

    Attributes:
        stem_channels: channels of the stem's stride-4 output.
        aux_channels: channels of the layer3 output (``"aux"``).
        out_channels: channels of the layer4 output (``"out"``).
        output_stride: input size / feature size of ``"aux"`` and ``"out"`` (8 or 16).
        normalization: the input normalisation its pretrained weights expect (class attribute).
    """

    stem_channels: int
    aux_channels: int
    out_channels: int
    output_stride: int
    normalization: Normalization = IMAGENET_NORMALIZATION
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module

    def forward_stem(self, x: Tensor) -> Tensor:
        """Map (B, 3, H, W) images to (B, stem_channels, ~H/4, ~W/4) stem features."""
        raise NotImplementedError

    def adapt_pretrained(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A pretrained file's tensors renamed to this module's keys, the classifier dropped.

        The default drops a torchvision-style classifier (``fc.*``); backbones whose files use another
        layout override it.
        """
        return {key: value for key, value in state.items() if not key.startswith("fc.")}

    def forward(self, x: Tensor, stem_hook: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """Compute the layer3 and layer4 features.

        Args:
            x: (B, 3, H, W) normalised images.
            stem_hook: applied once to the (B, stem_channels, ~H/4, ~W/4) stem output; its result (same
                shape) is what ``layer1`` consumes. Used to place an attention module before the deep stages.

        Returns:
            ``{"aux": (B, aux_channels, h, w), "out": (B, out_channels, h, w)}`` with h, w about H, W divided
            by ``output_stride`` (exact sizes follow the conv arithmetic, e.g. 65 -> 9 at stride 8).
        """
        features = self.forward_stem(x)
        if stem_hook is not None:
            features = stem_hook(features)
        features = self.layer2(self.layer1(features))
        aux = self.layer3(features)
        out = self.layer4(aux)
        return {"aux": aux, "out": out}
