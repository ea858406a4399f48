"""Profiling helpers against counts worked out by hand."""

from __future__ import annotations

import torch
from torch import nn

from ccnet import CrissCrossAttention, NonLocal2d, RecurrentAttention, build_ccnet
from ccnet.profiling import (
    compare_attention,
    count_flops_on_meta,
    format_table,
    model_summary,
    peak_memory_bytes,
    saved_tensor_bytes,
)


def test_flops_match_the_paper_formulas() -> None:
    size, channels, keys = 97, 512, 64
    pixels = size * size
    convs = 2 * pixels * channels * (2 * keys + channels)  # 1x1 query, key and value convs
    nonlocal_flops = convs + 2 * pixels * pixels * (keys + channels)
    cross = size + size  # column and row energies are computed whole; the centre is masked afterwards
    criss_cross_flops = convs + 2 * pixels * cross * (keys + channels)
    shape = (1, channels, size, size)
    assert count_flops_on_meta(lambda: NonLocal2d(channels), shape) == nonlocal_flops
    assert count_flops_on_meta(lambda: CrissCrossAttention(channels), shape) == criss_cross_flops
    recurrent = count_flops_on_meta(lambda: RecurrentAttention(CrissCrossAttention(channels), 2), shape)
    assert recurrent == 2 * criss_cross_flops
    assert round(nonlocal_flops / 1e9) == 108 and round(recurrent / 1e9, 1) == 16.5  # the paper's figures


def test_saved_bytes_exclude_parameters_and_input() -> None:
    linear = nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    assert saved_tensor_bytes(linear, x) == 0  # a linear layer keeps only its input and weight
    squared = saved_tensor_bytes(nn.Sequential(linear, nn.Tanh()), x)
    assert squared == 4 * 8 * 4  # tanh keeps its output


def test_cpu_peak_memory_sees_a_large_temporary() -> None:
    class Big(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.expand(1024, 1024) * 2).sum(dim=0, keepdim=True)

    peak = peak_memory_bytes(Big(), torch.randn(1, 1024, requires_grad=True))
    assert 4 * 2**20 <= peak < 16 * 2**20  # one (1024, 1024) float32 temporary, give or take


def test_compare_attention_table() -> None:
    rows = compare_attention((9, 11), channels=32, repeats=1)
    names = [row.name for row in rows]
    assert names == [
        "non-local",
        "criss-cross R=1",
        "criss-cross R=2",
        "criss-cross R=3",
        "rows-then-columns",
    ]
    flops = {row.name: row.gflops for row in rows}
    assert flops["criss-cross R=2"] == 2 * flops["criss-cross R=1"]
    table = format_table(rows, "non-local")
    assert table.splitlines()[2].startswith("non-local") and "1.000" in table.splitlines()[2]


def test_model_summary_counts_params() -> None:
    summary = model_summary("ccnet_tiny", 4, (65, 65))
    params = sum(p.numel() for p in build_ccnet("ccnet_tiny", 4).parameters())
    assert f"{params / 1e6:.2f} M params" in summary
