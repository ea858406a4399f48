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

Each module computes its function with one of several implementations, chosen once by ``impl`` at
construction (``CCNetConfig.impl``, ``model.impl`` in run configs) and dispatched in one place
(:meth:`_QKVAttention.forward`):

- ``autograd``: the reference einsums (:mod:`ccnet.attention_reference`), differentiated by autograd;
- ``lean`` (criss-cross only): when training, a step with a hand-written backward that keeps only the input
  and the attention (:mod:`ccnet.attention_lean`); inference runs the reference forward;
- ``triton`` (criss-cross and rows-then-columns): fused kernels with no energy tensor
  (:mod:`ccnet.attention_triton`); CUDA, or the CPU under ``TRITON_INTERPRET=1``, else an error;
- ``auto`` (default): ``triton`` on CUDA when Triton is installed and the input suits the kernels, else
  ``lean`` where the module has it, else ``autograd``.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import ClassVar

import torch
from torch import Tensor, nn

from ccnet.attention_lean import criss_cross_step
from ccnet.attention_reference import aggregate, energy, mask_centre

IMPLEMENTATIONS = ("auto", "triton", "lean", "autograd")


class _QKVAttention(nn.Module):
    """Shared parameterisation: Q/K projections to ``in_channels // reduction``, V at ``in_channels``, the
    residual scale ``gamma`` (``gamma_init``, 0 in the paper); and the one dispatch to the implementation
    ``impl`` (see the module's docstring)."""

    IMPLS: ClassVar[tuple[str, ...]] = ("auto", "autograd")  # what this module can run

    def __init__(
        self, in_channels: int, reduction: int = 8, impl: str = "auto", gamma_init: float = 0.0
    ) -> None:
        super().__init__()
        if in_channels < 1 or reduction < 1 or in_channels // reduction < 1:
            raise ValueError(
                f"in_channels={in_channels} and reduction={reduction} leave no query/key channels"
            )
        if impl not in self.IMPLS:
            raise ValueError(f"{type(self).__name__} has no impl={impl!r}; choose one of {list(self.IMPLS)}")
        self.in_channels = in_channels
        self.reduction = reduction
        self.impl = impl
        key_channels = in_channels // reduction
        self.query = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.key = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.value = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.full((1,), float(gamma_init)))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, reduction={self.reduction}, impl={self.impl}"

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )

    def implementation(self, x: Tensor) -> str:
        """The implementation a forward on ``x`` runs: ``impl``, or what ``auto`` picks for ``x``."""
        if x.device.type == "meta":  # shape and FLOP counting: the reference formulation
            return "autograd"
        if self.impl == "triton":
            if not _triton_runs_on(x.device):
                raise RuntimeError(
                    "impl='triton': the Triton kernels need a CUDA device or "
                    f"TRITON_INTERPRET=1, got {x.device}"
                )
            return "triton"
        if self.impl != "auto":
            return self.impl
        if "triton" in self.IMPLS and _triton_suits(x, self.query.out_channels):
            return "triton"
        return "lean" if "lean" in self.IMPLS else "autograd"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        impl = self.implementation(x)
        if impl == "triton":
            return self.gamma * self._triton(x) + x
        if impl == "lean" and torch.is_grad_enabled():
            return criss_cross_step(x, self.gamma, self.query, self.key, self.value)
        return self.gamma * self._reference(x) + x

    def _reference(self, x: Tensor) -> Tensor:
        """The aggregation by the reference einsums (the ``autograd`` implementation)."""
        raise NotImplementedError

    def _triton(self, x: Tensor) -> Tensor:
        """The aggregation by the Triton kernels."""
        raise NotImplementedError


@functools.cache
def _triton_installed() -> bool:
    """Looked up once: every ``auto`` forward on CUDA asks."""
    return importlib.util.find_spec("triton") is not None


def _triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``)."""
    if not _triton_installed():
        return False
    from ccnet import attention_triton  # lazy: imports triton, which a CPU-only install may lack

    return attention_triton.available(device)


def _triton_suits(x: Tensor, key_channels: int) -> bool:
    """``auto``'s test: CUDA, Triton installed, a dtype the kernels take, query/key channels in one tile."""
    if x.device.type != "cuda" or x.dtype == torch.float64 or not _triton_installed():
        return False
    from ccnet import attention_triton  # lazy: as above

    return key_channels <= attention_triton.MAX_KEY_CHANNELS


def _softmax_fp32(energy: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Softmax over the last dim in at least float32 (stable under fp16/bf16 autocast), cast back for
    aggregation; float64 stays float64."""
    return torch.softmax(energy.to(torch.promote_types(energy.dtype, torch.float32)), dim=-1).to(out_dtype)


class CrissCrossAttention(_QKVAttention):
    """Criss-cross attention: one softmax over the H + W - 1 pixels of each pixel's row and column.

    Args:
        in_channels: channels C of the input and output.
        reduction: query/key channels are ``C // reduction`` (8 in the paper: 512 -> 64).
        impl: ``auto`` (default), ``triton``, ``lean`` or ``autograd`` (see the module's docstring); all give
            the same results, at different memory and speed.

    Shapes:
        input (B, C, H, W) -> output (B, C, H, W); H and W are independent.
    """

    IMPLS = IMPLEMENTATIONS

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

    def _reference(self, x: Tensor) -> Tensor:
        attention, value = self.attention_weights(x)
        return aggregate(attention, value)

    def _triton(self, x: Tensor) -> Tensor:
        from ccnet import attention_triton  # lazy: imports triton

        return attention_triton.criss_cross_aggregate(self.query(x), self.key(x), self.value(x))


class AxialAttention(_QKVAttention):
    """Rows-then-columns attention: a row pass and a column pass, each with its own softmax.

    The row pass aggregates the values along each row; the column pass aggregates the row pass's output
    along each column with column attention from the same queries and keys. One module therefore reaches
    every pixel (as RCCA with R=2 does) at about the cost of one criss-cross step, each pass costing about
    half of one.

    Args:
        in_channels: channels C of the input and output.
        reduction: query/key channels are ``C // reduction``.
        impl: ``auto``, ``triton`` or ``autograd`` (no ``lean`` op for this one).
    """

    IMPLS = ("auto", "triton", "autograd")

    def attention_weights(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(row_attention (B, H, W, W), column_attention (B, H, W, H), value (B, C, H, W))``."""
        self._check_input(x)
        query, key, value = self.query(x), self.key(x), self.value(x)
        row = _softmax_fp32(torch.einsum("bchw,bchj->bhwj", query, key), value.dtype)  # (B, H, W, W)
        column = _softmax_fp32(torch.einsum("bchw,bcjw->bhwj", query, key), value.dtype)  # (B, H, W, H)
        return row, column, value

    def _reference(self, x: Tensor) -> Tensor:
        row, column, value = self.attention_weights(x)
        along_rows = torch.einsum("bhwj,bchj->bchw", row, value)
        return torch.einsum("bhwj,bcjw->bchw", column, along_rows)

    def _triton(self, x: Tensor) -> Tensor:
        from ccnet import attention_triton  # lazy: imports triton

        return attention_triton.axial_aggregate(self.query(x), self.key(x), self.value(x))


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

    def _reference(self, x: Tensor) -> Tensor:
        attention, value = self.attention_weights(x)
        # out[b, c, i] = sum_j attention[b, i, j] * value[b, c, j]
        return torch.bmm(value, attention.transpose(1, 2)).view_as(x)  # (B, C, HW) -> (B, C, H, W)


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


def build_attention(
    kind: str, in_channels: int, reduction: int = 8, impl: str = "auto", gamma_init: float = 0.0
) -> nn.Module:
    """Build an attention module by name (one of :data:`ATTENTION_TYPES`) with implementation ``impl`` and
    ``gamma`` starting at ``gamma_init``."""
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"unknown attention {kind!r}; choose one of {sorted(ATTENTION_TYPES)}")
    return ATTENTION_TYPES[kind](in_channels, reduction, impl=impl, gamma_init=gamma_init)


__all__ = [
    "ATTENTION_TYPES",
    "IMPLEMENTATIONS",
    "AxialAttention",
    "CrissCrossAttention",
    "NonLocal2d",
    "RecurrentAttention",
    "build_attention",
]
