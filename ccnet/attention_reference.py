"""The reference implementation of criss-cross attention's primitives: plain einsums that autograd
differentiates (the ``autograd`` implementation of :mod:`ccnet.attention`, and the oracle the ``lean`` op of
:mod:`ccnet.attention_lean` and the Triton kernels of :mod:`ccnet.attention_triton` are tested against).

    attention = softmax(mask_centre(energy(q, k)))   # (B, H, W, H + W): column part, then row part
    out = aggregate(attention, v)                     # (B, C, H, W)
"""

from __future__ import annotations

import torch
from torch import Tensor


def energy(a: Tensor, b: Tensor) -> Tensor:
    """(B, C, H, W) x (B, C, H, W) -> (B, H, W, H + W): each pixel of ``a`` against its column, then its
    row, of ``b``."""
    column = torch.einsum("bchw,bcjw->bhwj", a, b)  # (B, H, W, H)
    row = torch.einsum("bchw,bchj->bhwj", a, b)  # (B, H, W, W)
    return torch.cat([column, row], dim=-1)


def mask_centre(energies: Tensor) -> Tensor:
    """Set the centre's column entry to -inf in place, so the centre is counted once (in the row)."""
    height = energies.shape[1]
    diagonal = torch.arange(height, device=energies.device)
    energies[:, diagonal, :, diagonal] = float("-inf")  # (H, B, W) entries: pixel (h, w) against (h, w)
    return energies


def aggregate(attention: Tensor, value: Tensor) -> Tensor:
    """out[b, :, h, w] = sum over the cross of (h, w) of attention * value -> (B, C, H, W)."""
    height = attention.shape[1]
    out = torch.einsum("bhwj,bcjw->bchw", attention[..., :height], value)
    return out.add_(torch.einsum("bhwj,bchj->bchw", attention[..., height:], value))
