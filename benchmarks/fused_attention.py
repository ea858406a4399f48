"""The attention implementations side by side: Triton vs lean vs autograd (einsum reference), and Non-local;
forward + backward.

    python benchmarks/fused_attention.py                       # 97x97x512, batch 8, bf16 autocast (CUDA)
    python benchmarks/fused_attention.py --batch 1 --feature-size 33 --dtype float32   # a quick one

Each row is one module (a single step, R=1, with the 1x1 projections) timed over ``--repeats`` forward +
backward passes after a warm-up (median), and its peak memory above the input during one pass. Ratios are
to the einsum reference (``impl='autograd'``: plain autograd through the energy tensor). The Triton
rows need CUDA (Triton); on the CPU they are left out and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

import torch
from torch import nn

from ccnet import AxialAttention, CrissCrossAttention, NonLocal2d
from ccnet.profiling import peak_memory_bytes, time_forward_backward

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def variants(channels: int, cuda: bool) -> dict[str, Callable[[], nn.Module]]:
    rows: dict[str, Callable[[], nn.Module]] = {}
    if cuda:
        rows["criss-cross fused (Triton)"] = lambda: CrissCrossAttention(channels, impl="triton")
    rows |= {
        "criss-cross einsum (reference)": lambda: CrissCrossAttention(channels, impl="autograd"),
        "criss-cross lean backward": lambda: CrissCrossAttention(channels, impl="lean"),
        "non-local": lambda: NonLocal2d(channels),
    }
    if cuda:
        rows["rows-then-columns fused"] = lambda: AxialAttention(channels, impl="triton")
    rows["rows-then-columns einsum"] = lambda: AxialAttention(channels, impl="autograd")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feature-size", type=int, default=97)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="autocast dtype (float32: none)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shape = (args.batch, args.channels, args.feature_size, args.feature_size)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    results = {}
    for name, build in variants(args.channels, device.type == "cuda").items():
        torch.manual_seed(0)
        module = build().to(device)
        with torch.no_grad():
            module.gamma.fill_(0.5)  # gamma = 0 would let backward skip the attention's gradients
        x = torch.randn(shape, device=device, requires_grad=True)
        try:
            with autocast:
                peak = peak_memory_bytes(module, x) / 2**20
                milliseconds = time_forward_backward(module, x, repeats=args.repeats, warmup=2)
        except torch.OutOfMemoryError:
            peak = milliseconds = float("nan")
        results[name] = (milliseconds, peak)
        del module, x
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base_ms, base_mib = results["criss-cross einsum (reference)"]
    lines = [
        f"attention forward + backward, batch {args.batch}, {args.channels}x{args.feature_size}x"
        f"{args.feature_size}, {args.dtype} on {device.type} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}):",
        "| module | ms | x faster than einsum | peak MiB | x less memory than einsum |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (milliseconds, peak) in results.items():
        lines.append(
            f"| {name} | {milliseconds:.2f} | {base_ms / milliseconds:.2f} | {peak:.0f} | "
            f"{base_mib / peak:.2f} |"
        )
    if "criss-cross fused (Triton)" in results:
        fused_ms, fused_mib = results["criss-cross fused (Triton)"]
        nonlocal_ms = results["non-local"][0]
        lines.append(
            f"\ntargets: fused >= 2x faster than einsum: {base_ms / fused_ms:.2f}x; "
            f"<= 0.5 of its memory: {fused_mib / base_mib:.2f}; "
            f"faster than non-local: {nonlocal_ms / fused_ms:.2f}x"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
