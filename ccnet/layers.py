"""Small building blocks shared by backbones and heads."""

from __future__ import annotations

from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv (no bias, "same" padding for odd kernels at any dilation) -> BatchNorm -> ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
