"""onnxruntime against PyTorch on the CPU: the same exported model, the same inputs, measured side by side.

    python benchmarks/onnx_vs_torch.py             # ccnet_lite0_d16 (the CamVid model), 11 classes
    python benchmarks/onnx_vs_torch.py --model ccnet_tiny --repeats 3

For each input size (480x360, CamVid's frames; 1024x512, half a Cityscapes frame) it times one image's
forward pass, alternating the two backends so that a busy machine slows both alike, and prints the median
of each, their ratio (PyTorch time / onnxruntime time: above 1, onnxruntime is faster) and the parity of
their logits. Both use every core torch uses (``torch.get_num_threads()``). Name the CPU (``lscpu``) beside
the figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ccnet import build_ccnet
from ccnet.export import OnnxSegmenter, export_onnx
from pipeline.eval.onnx import parity

SIZES = ((360, 480), (512, 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ccnet_lite0_d16")
    parser.add_argument("--num-classes", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per backend and size")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_ccnet(args.model, args.num_classes, gamma_init=0.5).eval()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        segmenter = OnnxSegmenter(export_onnx(model, Path(folder) / "model.onnx"), threads=threads)
        exported = time.perf_counter() - started
        rows = []
        for height, width in SIZES:
            image = torch.randn(1, 3, height, width)
            report = parity(model, segmenter, images=[image])
            times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
            with torch.inference_mode():
                model(image), segmenter(image)  # warm-up
                for _ in range(args.repeats):
                    for name, run in (("torch", model), ("onnxruntime", segmenter)):
                        start = time.perf_counter()
                        run(image)
                        times[name].append(time.perf_counter() - start)
            torch_ms, ort_ms = (1000 * statistics.median(times[k]) for k in ("torch", "onnxruntime"))
            rows.append(
                f"| {width}x{height} | {torch_ms:.0f} | {ort_ms:.0f} | {torch_ms / ort_ms:.2f} | "
                f"{report.max_logit_difference:.1e} | {100 * report.argmax_agreement:.3f} |"
            )
    print(
        f"{args.model}, {args.num_classes} classes, batch 1, {threads} threads, median of {args.repeats}; "
        f"export {exported:.0f} s"
    )
    print("| input | PyTorch ms | onnxruntime ms | PyTorch/ORT | max abs logit diff | argmax agree % |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
