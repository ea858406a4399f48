"""Segmentation heads: the RCCA head of CCNet and the auxiliary FCN head."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ccnet.attention import RecurrentAttention, build_attention
from ccnet.layers import ConvBNReLU


@contextlib.contextmanager
def separate_rng(stream: str) -> Iterator[None]:
    """Draw the enclosed initialisation from a CPU generator of its own, seeded by the global seed
    (``torch.initial_seed()``) and ``stream``, and leave the global random state as it was.

    Ablations compare variants that differ only in their attention. With the attention's parameters drawn
    from the global stream, adding or removing it would shift every later draw, so the FCN twin's head would
    start from other weights than CCNet's, and a paired comparison over seeds would pair different
    initialisations. Under this context every layer that the variants share starts identical for one seed.
    """
    seed = (torch.initial_seed() * 1_000_003 + zlib.crc32(stream.encode())) % 2**63
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: models are built on the CPU
        torch.manual_seed(seed)
        yield


def build_recurrent_attention(
    attention: str,
    in_channels: int,
    recurrence: int,
    reduction: int = 8,
    impl: str = "auto",
    stream: str = "attention",
    gamma_init: float = 0.0,
) -> nn.Module:
    """Shared-weight attention applied ``recurrence`` times; ``recurrence=0`` builds no module at all.

    No module (``nn.Identity``) rather than an unused one, so every parameter of a model gets a gradient
    (DistributedDataParallel needs that without ``find_unused_parameters``). The attention's weights are drawn
    from their own generator named by ``stream`` (:func:`separate_rng`): building it draws nothing from the
    global random stream, so the layers around it get the same weights whatever the attention.
    """
    if recurrence == 0:
        return nn.Identity()
    with separate_rng(stream):
        module = build_attention(attention, in_channels, reduction, impl, gamma_init)
    return RecurrentAttention(module, recurrence)


class RCCAHead(nn.Module):
    """The CCNet head: reduce -> attention x R -> project -> concat with the input -> bottleneck -> classify.

    Args:
        in_channels: channels of the backbone's output (2048 for ResNets).
        num_classes: number of output classes.
        channels: width of the attention (512 in the paper).
        bottleneck_channels: width of the 3x3 conv after the concatenation.
        attention: ``"criss_cross"``, ``"axial"`` or ``"nonlocal"``.
        recurrence: number of shared-weight attention steps R; 0 gives a plain dilated FCN head.
        reduction: query/key channels are ``channels // reduction``.
        dropout: Dropout2d probability before the classifier.
        embedding_channels: when > 0, also return a 1x1 projection of the attended features of this
            width, for the category-consistent loss.
        impl: the attention's implementation: ``auto``, ``triton``, ``lean`` or ``autograd``.
        gamma_init: the attention's residual scale ``gamma`` at initialisation (0 in the paper).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: int = 512,
        bottleneck_channels: int = 512,
        attention: str = "criss_cross",
        recurrence: int = 2,
        reduction: int = 8,
        dropout: float = 0.1,
        embedding_channels: int = 0,
        impl: str = "auto",
        gamma_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.reduce = ConvBNReLU(in_channels, channels)
        self.attention = build_recurrent_attention(
            attention, channels, recurrence, reduction, impl, stream="head_attention", gamma_init=gamma_init
        )
        self.project = ConvBNReLU(channels, channels)
        self.bottleneck = ConvBNReLU(in_channels + channels, bottleneck_channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(bottleneck_channels, num_classes, kernel_size=1)
        self.embedding = nn.Conv2d(channels, embedding_channels, 1) if embedding_channels > 0 else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Map backbone features (B, in_channels, h, w) to ``{"out": (B, K, h, w)}`` (+ ``"embedding"``)."""
        context = self.project(self.attention(self.reduce(x)))
        fused = self.bottleneck(torch.cat([x, context], dim=1))  # (B, in_channels + channels, h, w) in
        outputs = {"out": self.classifier(self.dropout(fused))}
        if self.embedding is not None:
            outputs["embedding"] = self.embedding(context)
        return outputs


class FCNHead(nn.Sequential):
    """Auxiliary head on stage 3: 3x3 conv-BN-ReLU -> Dropout2d -> 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dropout: float = 0.1) -> None:
        super().__init__(
            ConvBNReLU(in_channels, channels),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, kernel_size=1),
        )
