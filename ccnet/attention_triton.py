"""The ``triton`` implementation: fused criss-cross and rows-then-columns attention in Triton, with no
(H + W) x H x W energy tensor, forward or backward.

A criss-cross step is two 1-D attentions that share one softmax: along each row (W keys) and along each
column (H keys, the pixel itself left out: it is counted in its row). Each pass is a flash-style kernel over
sequences of one axis (:mod:`ccnet.attention_triton_kernels`), addressed by strides, so the (B, C, H, W)
tensors are read in place:

1. ``lse_kernel``: per pixel, the log-sum-exp of its energies along the axis (online max/sum over key
   blocks); the two passes' values merge with ``logaddexp`` into the softmax's normaliser.
2. ``out_kernel``: ``sum_j exp(e_j - lse) v_j`` along the axis, added into one float32 output, so the row
   and column passes together give the criss-cross aggregation.
3. Backward (FlashAttention-2's recipe, with ``D = sum_c dy * y`` per pixel): ``dq_kernel`` per query block,
   ``dk_kernel`` and ``dv_kernel`` per key block, each recomputing the energies and accumulating into
   float32 gradients; the value channels (512 in the paper) are tiled.

Energies and softmax statistics are float32 (inputs fp32, fp16 or bf16); probabilities meet the values in the
values' dtype, as in the reference modules. The same kernels, with a softmax per pass, give the
rows-then-columns variant. On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set
before this module is imported), which is how the tests check them without a GPU.

    y = criss_cross_aggregate(q, k, v)   # == aggregate(softmax(mask_centre(energy(q, k))), v)
    y = axial_aggregate(q, k, v)         # rows, then columns of the result
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import triton
from torch import Tensor

from ccnet.attention_triton_kernels import dk_kernel, dq_kernel, dv_kernel, lse_kernel, out_kernel

MAX_KEY_CHANNELS = 256  # query/key channels are held in one tile


class _Axis(NamedTuple):
    """A pass over one axis of (B, C, H, W) tensors: sequences are (b, other index), positions the axis."""

    along_width: bool  # True: rows (keys along W); False: columns (keys along H)
    skip_centre: bool  # leave the pixel itself out (the column pass of criss-cross attention)


ROWS = _Axis(along_width=True, skip_centre=False)
COLUMNS = _Axis(along_width=False, skip_centre=False)
COLUMNS_WITHOUT_CENTRE = _Axis(along_width=False, skip_centre=True)


def _strides(t: Tensor, axis: _Axis) -> tuple[int, int, int, int]:
    """(batch, other spatial index, position along the axis, channel) strides of a (B, C, H, W) tensor."""
    s_b, s_c, s_h, s_w = t.stride()
    return (s_b, s_h, s_w, s_c) if axis.along_width else (s_b, s_w, s_h, s_c)


def _map_strides(t: Tensor, axis: _Axis) -> tuple[int, int, int]:
    """(batch, other, position) strides of a (B, H, W) per-pixel map."""
    s_b, s_h, s_w = t.stride()
    return (s_b, s_h, s_w) if axis.along_width else (s_b, s_w, s_h)


def _geometry(q: Tensor, axis: _Axis) -> tuple[int, int]:
    """(number of other-axis indices, sequence length)."""
    _, _, height, width = q.shape
    return (height, width) if axis.along_width else (width, height)


def _blocks(length: int, channels: int, key_channels: int) -> dict[str, int]:
    block = 16 if length <= 16 else 32 if length <= 32 else 64
    return {
        "BLOCK_M": block,
        "BLOCK_N": block,
        "BLOCK_C": min(64, max(16, triton.next_power_of_2(channels))),
        "BLOCK_CK": max(16, triton.next_power_of_2(key_channels)),
    }


def _precision(t: Tensor) -> str:
    """float32 inputs keep float32 products (the reference einsums do not use TF32 either)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


# ------------------------------------------------------------------------------------------- launchers


def _common(q: Tensor, axis: _Axis) -> tuple[int, int, dict[str, Any]]:
    others, length = _geometry(q, axis)
    meta = {
        "SKIP_CENTRE": axis.skip_centre,
        "PRECISION": _precision(q),
        "UPCAST": q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
    }
    return others, length, meta


def axis_lse(q: Tensor, k: Tensor, axis: _Axis) -> Tensor:
    """(B, H, W) float32 log-sum-exp of each pixel's energies along ``axis``."""
    batch, key_channels = q.shape[:2]
    others, length, meta = _common(q, axis)
    lse = torch.empty((batch, *q.shape[2:]), device=q.device, dtype=torch.float32)
    blocks = _blocks(length, 16, key_channels)
    grid = (batch * others, triton.cdiv(length, blocks["BLOCK_M"]))
    blocks.pop("BLOCK_C")
    lse_kernel[grid](
        q,
        k,
        lse,
        *_strides(q, axis),
        *_strides(k, axis),
        *_map_strides(lse, axis),
        others,
        length,
        key_channels,
        **meta,
        **blocks,
    )
    return lse


def axis_aggregate(q: Tensor, k: Tensor, v: Tensor, lse: Tensor, axis: _Axis, out: Tensor) -> None:
    """Adds ``sum_j exp(e_j - lse) v_j`` along ``axis`` into ``out`` (float32, (B, C, H, W))."""
    batch, key_channels = q.shape[:2]
    channels = v.shape[1]
    others, length, meta = _common(q, axis)
    blocks = _blocks(length, channels, key_channels)
    grid = (batch * others, triton.cdiv(length, blocks["BLOCK_M"]), triton.cdiv(channels, blocks["BLOCK_C"]))
    out_kernel[grid](
        q,
        k,
        v,
        lse,
        out,
        *_strides(q, axis),
        *_strides(k, axis),
        *_strides(v, axis),
        *_map_strides(lse, axis),
        *_strides(out, axis),
        others,
        length,
        key_channels,
        channels,
        **meta,
        **blocks,
    )


def axis_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad: Tensor,
    lse: Tensor,
    delta: Tensor,
    axis: _Axis,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
) -> None:
    """Adds this pass's gradients into the float32 ``dq``, ``dk``, ``dv``.

    Args:
        grad: the gradient of the aggregation (B, C, H, W); lse: the softmax normaliser the forward used;
        delta: ``sum_c grad * output`` per pixel (B, H, W), of the output that softmax produced.
    """
    batch, key_channels = q.shape[:2]
    channels = v.shape[1]
    others, length, meta = _common(q, axis)
    blocks = _blocks(length, channels, key_channels)
    sequences = batch * others
    common = (*_strides(q, axis), *_strides(k, axis))
    gq_args = (*common, *_strides(v, axis), *_strides(grad, axis), *_map_strides(lse, axis))
    dq_kernel[(sequences, triton.cdiv(length, blocks["BLOCK_M"]))](
        q,
        k,
        v,
        grad,
        lse,
        delta,
        dq,
        *gq_args,
        *_strides(dq, axis),
        others,
        length,
        key_channels,
        channels,
        **meta,
        **blocks,
    )
    dk_kernel[(sequences, triton.cdiv(length, blocks["BLOCK_N"]))](
        q,
        k,
        v,
        grad,
        lse,
        delta,
        dk,
        *gq_args,
        *_strides(dk, axis),
        others,
        length,
        key_channels,
        channels,
        **meta,
        **blocks,
    )
    dv_kernel[(sequences, triton.cdiv(length, blocks["BLOCK_N"]), triton.cdiv(channels, blocks["BLOCK_C"]))](
        q,
        k,
        grad,
        lse,
        dv,
        *common,
        *_strides(grad, axis),
        *_map_strides(lse, axis),
        *_strides(dv, axis),
        others,
        length,
        key_channels,
        channels,
        **meta,
        **blocks,
    )


# ------------------------------------------------------------------------------------------- autograd


def _zeros32(t: Tensor) -> Tensor:
    return torch.zeros(t.shape, device=t.device, dtype=torch.float32)


def _delta(grad: Tensor, out: Tensor) -> Tensor:
    """sum_c grad * out per pixel, float32 (B, H, W)."""
    return (grad.float() * out.float()).sum(1)


class _CrissCross(torch.autograd.Function):
    """y = aggregate(softmax over the criss-cross of each pixel, v); saves q, k, v, y and the lse."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        lse = torch.logaddexp(axis_lse(q, k, ROWS), axis_lse(q, k, COLUMNS_WITHOUT_CENTRE))
        out = _zeros32(v)
        for axis in (ROWS, COLUMNS_WITHOUT_CENTRE):
            axis_aggregate(q, k, v, lse, axis, out)
        y = out.to(v.dtype)
        ctx.save_for_backward(q, k, v, y, lse)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, y, lse = ctx.saved_tensors
        grad = grad.contiguous()
        delta = _delta(grad, y)
        dq, dk, dv = _zeros32(q), _zeros32(k), _zeros32(v)
        for axis in (ROWS, COLUMNS_WITHOUT_CENTRE):
            axis_backward(q, k, v, grad, lse, delta, axis, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Axial(torch.autograd.Function):
    """Rows, then columns of the result, each with its own softmax."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        lse_rows, lse_columns = axis_lse(q, k, ROWS), axis_lse(q, k, COLUMNS)
        along_rows = _zeros32(v)
        axis_aggregate(q, k, v, lse_rows, ROWS, along_rows)
        along_rows = along_rows.to(v.dtype)
        out = _zeros32(v)
        axis_aggregate(q, k, along_rows, lse_columns, COLUMNS, out)
        y = out.to(v.dtype)
        ctx.save_for_backward(q, k, v, along_rows, y, lse_rows, lse_columns)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, along_rows, y, lse_rows, lse_columns = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, d_rows = _zeros32(q), _zeros32(k), _zeros32(v)
        axis_backward(q, k, along_rows, grad, lse_columns, _delta(grad, y), COLUMNS, dq, dk, d_rows)
        d_rows = d_rows.to(v.dtype)
        dv = _zeros32(v)
        axis_backward(q, k, v, d_rows, lse_rows, _delta(d_rows, along_rows), ROWS, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape[0] != v.shape[0] or q.shape[2:] != v.shape[2:]:
        raise ValueError(
            f"expected q, k (B, C', H, W) and v (B, C, H, W), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] > MAX_KEY_CHANNELS:
        raise ValueError(
            f"the fused kernels hold at most {MAX_KEY_CHANNELS} query/key channels, got {q.shape[1]}"
        )
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            "the fused kernels take one of float32/float16/bfloat16 for q, k and v alike, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )


@torch.compiler.disable  # torch.compile leaves the kernels alone (they are fused already)
def criss_cross_aggregate(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The criss-cross aggregation of ``v`` by the softmax of ``q . k`` over each pixel's row and column
    (itself once): (B, C', H, W), (B, C', H, W), (B, C, H, W) -> (B, C, H, W), differentiable."""
    _check(q, k, v)
    return _CrissCross.apply(q, k, v)


@torch.compiler.disable
def axial_aggregate(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Rows-then-columns aggregation (a softmax per pass), differentiable; shapes as
    :func:`criss_cross_aggregate`."""
    _check(q, k, v)
    return _Axial.apply(q, k, v)


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: CUDA, or the CPU under Triton's interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
