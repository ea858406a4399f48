"""Attention modules compared in the CCNet paper.

All three map (B, C, H, W) -> (B, C, H, W) with the same parameterisation: queries and keys by 1x1 convs to
``C // reduction`` channels, values by a 1x1 conv at ``C`` channels, unscaled dot-product energies, and a
residual ``out = gamma * aggregated + x`` with the learned scalar ``gamma`` starting at 0, so every module is
the identity at initialisation. Softmaxes run in float32 under autocast; the aggregation runs in the values'
dtype.

- :class:`CrissCrossAttention`: each pixel attends to the H + W - 1 pixels of its row and column (itself
  once), one softmax over all of them (Huang et al., ICCV 2019).
- :class:`AxialAttention`: rows then columns, each with its own softmax; the column pass aggregates the
  output of the row pass, so one module reaches every pixel.
- :class:`NonLocal2d`: dense attention over all H * W pixels (Wang et al., CVPR 2018), the paper's baseline.
- :class:`RecurrentAttention`: the same module applied ``recurrence`` times with shared weights (RCCA).
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch
from torch import Tensor, nn

from ccnet.criss_cross_op import aggregate, criss_cross_step, energy, mask_centre


class _QKVAttention(nn.Module):
    """Shared parameterisation: Q/K projections to ``in_channels // reduction``, V at ``in_channels``."""

    def __init__(self, in_channels: int, reduction: int = 8) -> None:
        super().__init__()
        if in_channels < 1 or reduction < 1 or in_channels // reduction < 1:
            raise ValueError(
                f"in_channels={in_channels} and reduction={reduction} leave no query/key channels"
            )
        self.in_channels = in_channels
        self.reduction = reduction
        key_channels = in_channels // reduction
        self.query = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.key = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.value = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, reduction={self.reduction}"

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )


@functools.cache
def _triton_installed() -> bool:
    """Looked up once: every forward on CUDA asks."""
    return importlib.util.find_spec("triton") is not None


def _fused_kernels(x: Tensor, fused: bool | None, key_channels: int) -> ModuleType | None:
    """The Triton kernels (``ccnet.fused_attention``) when this call should use them, else None.

    ``fused=None`` (auto) uses them on CUDA when Triton is installed and the input suits them (float32,
    float16 or bfloat16; at most 256 query/key channels), the reference otherwise; True insists (CUDA, or the
    CPU under ``TRITON_INTERPRET=1``) and fails when they cannot run; False never uses them.
    """
    if fused is False or x.device.type == "meta":
        return None
    if fused is None and (x.device.type != "cuda" or x.dtype == torch.float64 or not _triton_installed()):
        return None
    from ccnet import fused_attention

    if fused is None and key_channels > fused_attention.MAX_KEY_CHANNELS:
        return None
    if not fused_attention.available(x.device):
        raise RuntimeError(f"fused=True: the Triton kernels need a CUDA device or TRITON_INTERPRET=1, "
                           f"got {x.device}")
    return fused_attention


def _softmax_fp32(energy: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Softmax over the last dim in at least float32 (stable under fp16/bf16 autocast), cast back for
    aggregation; float64 stays float64."""
    return torch.softmax(energy.to(torch.promote_types(energy.dtype, torch.float32)), dim=-1).to(out_dtype)


class CrissCrossAttention(_QKVAttention):
    """Criss-cross attention: one softmax over the H + W - 1 pixels of each pixel's row and column.

    Args:
        in_channels: channels C of the input and output.
        reduction: query/key channels are ``C // reduction`` (8 in the paper: 512 -> 64).
        memory_efficient: when training without the fused kernels, run the step as
            :class:`ccnet.criss_cross_op.CrissCrossStep`, which keeps only the input and the attention for
            backward and recomputes the projections (same results, several times less memory, about a fifth
            more compute). False differentiates the plain formulation with autograd.
        fused: the Triton kernels of :mod:`ccnet.fused_attention` (no energy tensor, forward or backward):
            None (default) uses them on CUDA when Triton is installed, True insists, False never.

    Shapes:
        input (B, C, H, W) -> output (B, C, H, W); H and W are independent.
    """

    def __init__(self, in_channels: int, reduction: int = 8, memory_efficient: bool = True,
                 fused: bool | None = None) -> None:
        super().__init__(in_channels, reduction)
        self.memory_efficient = memory_efficient
        self.fused = fused

    def attention_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the criss-cross attention and the values it aggregates.

        Returns:
            ``(attention, value)``: attention (B, H, W, H + W) sums to 1 over its last dim; entries
            ``[..., :H]`` weight the pixels of the column (the pixel itself weighted 0 there, it is counted
            in the row part), entries ``[..., H:]`` weight the pixels of the row. value is (B, C, H, W).
        """
        self._check_input(x)
        query, key, value = self.query(x), self.key(x), self.value(x)
        energies = mask_centre(energy(query, key))  # (B, H, W, H + W): column part, then row part
        return _softmax_fp32(energies, value.dtype), value

    def forward(self, x: Tensor) -> Tensor:
        if (kernels := _fused_kernels(x, self.fused, self.query.out_channels)) is not None:
            self._check_input(x)
            return self.gamma * kernels.criss_cross_aggregate(self.query(x), self.key(x), self.value(x)) + x
        if self.memory_efficient and torch.is_grad_enabled() and x.device.type != "meta":
            self._check_input(x)
            return criss_cross_step(x, self.gamma, self.query, self.key, self.value)
        attention, value = self.attention_weights(x)
        return self.gamma * aggregate(attention, value) + x


class AxialAttention(_QKVAttention):
    """Rows-then-columns attention: a row pass and a column pass, each with its own softmax.

    The row pass aggregates the values along each row; the column pass aggregates the row pass's output
    along each column with column attention from the same queries and keys. One module therefore reaches
    every pixel (as RCCA with R=2 does) at about the cost of one criss-cross step, each pass costing about
    half of one.

    Args:
        in_channels: channels C of the input and output.
        reduction: query/key channels are ``C // reduction``.
        fused: the Triton kernels, as for :class:`CrissCrossAttention`.
    """

    def __init__(self, in_channels: int, reduction: int = 8, fused: bool | None = None) -> None:
        super().__init__(in_channels, reduction)
        self.fused = fused

    def attention_weights(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(row_attention (B, H, W, W), column_attention (B, H, W, H), value (B, C, H, W))``."""
        self._check_input(x)
        query, key, value = self.query(x), self.key(x), self.value(x)
        row = _softmax_fp32(torch.einsum("bchw,bchj->bhwj", query, key), value.dtype)  # (B, H, W, W)
        column = _softmax_fp32(torch.einsum("bchw,bcjw->bhwj", query, key), value.dtype)  # (B, H, W, H)
        return row, column, value

    def forward(self, x: Tensor) -> Tensor:
        if (kernels := _fused_kernels(x, self.fused, self.query.out_channels)) is not None:
            self._check_input(x)
            return self.gamma * kernels.axial_aggregate(self.query(x), self.key(x), self.value(x)) + x
        row, column, value = self.attention_weights(x)
        along_rows = torch.einsum("bhwj,bchj->bchw", row, value)
        along_columns = torch.einsum("bhwj,bcjw->bchw", column, along_rows)
        return self.gamma * along_columns + x


class NonLocal2d(_QKVAttention):
    """Non-local block (embedded Gaussian): one softmax over all H * W pixels.

    Parameterised like :class:`CrissCrossAttention` (Q/K at ``C // reduction``, ``gamma`` from 0), as in the
    CCNet paper's comparison, so the two differ only in which pixels each pixel attends to.
    """

    def attention_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(attention (B, H*W, H*W), value (B, C, H*W))``; rows are queries and sum to 1."""
        self._check_input(x)
        query = self.query(x).flatten(2)  # (B, C', HW)
        key = self.key(x).flatten(2)  # (B, C', HW)
        value = self.value(x).flatten(2)  # (B, C, HW)
        energy = torch.bmm(query.transpose(1, 2), key)  # (B, HW, HW)
        return _softmax_fp32(energy, value.dtype), value

    def forward(self, x: Tensor) -> Tensor:
        attention, value = self.attention_weights(x)
        # out[b, c, i] = sum_j attention[b, i, j] * value[b, c, j]
        out = torch.bmm(value, attention.transpose(1, 2)).view_as(x)  # (B, C, HW) -> (B, C, H, W)
        return self.gamma * out + x


class RecurrentAttention(nn.Module):
    """Apply one attention module ``recurrence`` times with shared weights (RCCA when it is criss-cross).

    ``recurrence=0`` is the identity; with criss-cross attention, R=1 lets each pixel see its row and column
    and R=2 lets it see every pixel.
    """

    def __init__(self, attention: nn.Module, recurrence: int = 2) -> None:
        super().__init__()
        if recurrence < 0:
            raise ValueError(f"recurrence must be >= 0, got {recurrence}")
        self.attention = attention
        self.recurrence = recurrence

    def extra_repr(self) -> str:
        return f"recurrence={self.recurrence}"

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.recurrence):
            x = self.attention(x)
        return x


ATTENTION_TYPES: dict[str, type[_QKVAttention]] = {
    "criss_cross": CrissCrossAttention,
    "axial": AxialAttention,
    "nonlocal": NonLocal2d,
}


def build_attention(kind: str, in_channels: int, reduction: int = 8, fused: bool | None = None) -> nn.Module:
    """Build an attention module by name: one of :data:`ATTENTION_TYPES`. ``fused`` chooses the Triton kernels
    of the criss-cross and rows-then-columns modules (None: on CUDA when available); Non-local has none."""
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"unknown attention {kind!r}; choose one of {sorted(ATTENTION_TYPES)}")
    if kind == "nonlocal":
        return NonLocal2d(in_channels, reduction)
    return ATTENTION_TYPES[kind](in_channels, reduction, fused=fused)


__all__ = [
    "ATTENTION_TYPES",
    "AxialAttention",
    "CrissCrossAttention",
    "NonLocal2d",
    "RecurrentAttention",
    "build_attention",
]
