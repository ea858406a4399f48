"""The paper's efficiency comparison, measured: Non-local vs criss-cross R=1/2/3 vs rows-then-columns.

    python benchmarks/attention_efficiency.py                 # 97x97x512 (769x769 at output stride 8)
    python benchmarks/attention_efficiency.py --feature-size 49 --repeats 1

Prints one table (GFLOPs, MiB saved for backward, peak MiB during forward + backward, time; each with its
ratio to Non-local), the paper's figures beside ours, the params and GFLOPs of CCNet-R101 at 769x769, and
on CUDA a bf16 table and a check that bf16/fp16 autocast gives finite outputs and gradients.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ccnet import AxialAttention, CrissCrossAttention, NonLocal2d
from ccnet.profiling import Profile, compare_attention, format_table, model_summary

# Huang et al., CCNet (ICCV 2019), Table 2 / Sec. 4.3: one 769x769 image, 97x97x512 features.
PAPER = {"non-local": (108.0, 1411.0), "criss-cross R=2": (16.5, 127.0)}


def paper_comparison(rows: list[Profile]) -> str:
    by_name = {row.name: row for row in rows}
    base, ours = by_name["non-local"], by_name["criss-cross R=2"]
    paper_flops = PAPER["criss-cross R=2"][0] / PAPER["non-local"][0]
    paper_memory = PAPER["non-local"][1] / PAPER["criss-cross R=2"][1]
    lines = [
        "criss-cross R=2 vs non-local        ours            paper",
        f"FLOPs fewer                         {1 - ours.gflops / base.gflops:>6.1%}          "
        f"{1 - paper_flops:>6.1%}",
        f"memory, peak (x less)               {base.peak_mib / ours.peak_mib:>6.1f}x         "
        f"{paper_memory:>6.1f}x",
        f"memory, saved for backward (x less) {base.saved_mib / ours.saved_mib:>6.1f}x",
        f"time, forward + backward (x faster) {base.time_ms / ours.time_ms:>6.1f}x",
    ]
    return "\n".join(lines)


def autocast_check(device: torch.device, size: int, channels: int) -> str:
    lines = []
    for dtype in (torch.bfloat16, torch.float16):
        for cls in (CrissCrossAttention, AxialAttention, NonLocal2d):
            module = cls(channels).to(device)
            torch.nn.init.constant_(module.gamma, 0.5)
            x = torch.randn(2, channels, size, size + 3, device=device, requires_grad=True)
            with torch.autocast(device.type, dtype=dtype):
                out = module(x)
            out.float().sum().backward()
            finite = bool(torch.isfinite(out).all() and torch.isfinite(x.grad).all()) and all(
                bool(torch.isfinite(p.grad).all()) for p in module.parameters()
            )
            lines.append(f"{str(dtype):<16}{cls.__name__:<22}{out.dtype!s:<16}finite={finite}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feature-size", type=int, default=97)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = (args.feature_size, args.feature_size)
    out = sys.stdout
    out.write(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads\n\n")
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        rows = compare_attention(
            size,
            args.channels,
            args.batch,
            device=device,
            dtype=dtype,
            repeats=args.repeats,
            include_autograd=True,
        )
        out.write(
            f"batch {args.batch}, {args.channels}x{size[0]}x{size[1]} features, {dtype}, "
            f"ratios (/ref) to non-local:\n{format_table(rows, 'non-local')}\n\n"
        )
        if dtype == torch.float32:
            out.write(paper_comparison(rows) + "\n\n")
    image = (args.feature_size - 1) * 8 + 1
    models = ("ccnet_r101_deepstem_d8", "ccnet_r101_d8", "nonlocal_r101_deepstem_d8", "fcn_r101_deepstem_d8")
    for name in models:
        out.write(model_summary(name, 19, (image, image)) + "\n")
    if device.type == "cuda":
        out.write("\nautocast (dtype, module, output dtype, outputs and gradients finite):\n")
        out.write(autocast_check(device, 33, 64) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
