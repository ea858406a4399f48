"""The whole training step of CCNet at the paper's size, per AMP level, with and without the data pipeline.

    python benchmarks/train_step.py                # CCNet-R101 (deep stem), 769x769, batch 8, O0/O1/O2
    python benchmarks/train_step.py --model ccnet_tiny --crop 129 --batch 2 --steps 3 --images 8   # CPU smoke

For each level (O0 float32, O1 float16 + GradScaler, O2 bfloat16) it times ``--steps`` training steps
(``pipeline.train.loop.train_step``: forward, loss main + 0.4 aux, backward, SGD) after a warm-up, twice
side by side: on batches already on the device, and fed by the data pipeline (Parquet shards of a generated
dataset -> ``ShardDataset`` with the training augmentation -> DataLoader workers -> pinned copies), so the
difference is the pipeline's cost. Then a profiler summary of one O2 step: where its time goes, top kernels
first.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time

import torch

from ccnet import build_ccnet
from ccnet.losses import SegmentationLoss
from pipeline.data.readers import ShardDataset
from pipeline.data.sources import build_source
from pipeline.data.transforms import build_train_transform
from pipeline.data.writer import write_shards
from pipeline.train.loop import AMP_DTYPES, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loader(
    uri: str, crop: int, batch: int, workers: int, device: torch.device
) -> torch.utils.data.DataLoader:
    dataset = ShardDataset(uri, "train", transform=build_train_transform(crop, (0.75, 2.0)))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def measure(
    args: argparse.Namespace,
    level: str,
    loader: torch.utils.data.DataLoader | None,
    device: torch.device,
    num_classes: int,
) -> tuple[float, float]:
    """(images per second, peak GiB) of ``args.steps`` steps after ``args.warmup``."""
    torch.manual_seed(0)
    model = build_ccnet(args.model, num_classes).to(device).train()
    if args.channels_last:  # NHWC: what oneDNN's (and cuDNN's) fastest convolutions take
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=level == "O1")
    loss_fn = SegmentationLoss(aux_weight=0.4)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    fixed = (
        torch.randn(args.batch, 3, args.crop, args.crop, device=device).to(memory_format=memory_format),
        torch.randint(0, num_classes, (args.batch, args.crop, args.crop), device=device),
    )
    batches = (
        itertools.repeat(fixed)
        if loader is None
        else (
            (b["image"].to(device, non_blocking=True), b["label"].to(device, non_blocking=True))
            for b in itertools.cycle(loader)
        )
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step, (images, labels) in enumerate(batches):
        if step == args.warmup:
            _sync(device)
            start = time.perf_counter()
        if step == args.warmup + args.steps:
            break
        train_step(model, images, labels, loss_fn, optimizer, scaler, AMP_DTYPES[level])
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return args.steps * args.batch / seconds, peak


def profile_summary(args: argparse.Namespace, device: torch.device, num_classes: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    model = build_ccnet(args.model, num_classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    loss_fn = SegmentationLoss(aux_weight=0.4)
    images = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    labels = torch.randint(0, num_classes, (args.batch, args.crop, args.crop), device=device)
    dtype = AMP_DTYPES["O2"] if device.type == "cuda" else None
    train_step(model, images, labels, loss_fn, optimizer, scaler, dtype)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(model, images, labels, loss_fn, optimizer, scaler, dtype)
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=args.top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ccnet_r101_deepstem_d8")
    parser.add_argument("--crop", type=int, default=769)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--levels", default="O0,O1,O2")
    parser.add_argument("--images", type=int, default=32, help="generated images in the shards")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the generated images")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader processes")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--channels-last", action="store_true", help="model and images in NHWC")
    parser.add_argument("--top", type=int, default=15, help="rows of the profiler summary")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device, num_classes = torch.device(args.device), 19
    levels = [level for level in args.levels.split(",") if device.type == "cuda" or level != "O1"]

    with tempfile.TemporaryDirectory() as folder:
        size = (args.image_size, args.image_size)
        source = build_source("generated", None, image_size=size, counts={"train": args.images, "val": 1})
        uri, _ = write_shards(source, folder, splits=["train"], progress=False)
        loader = _loader(uri, args.crop, args.batch, args.workers, device)
        rows = []
        for level in levels:
            on_device, peak = measure(args, level, None, device, num_classes)
            fed, _ = measure(args, level, loader, device, num_classes)
            rows.append((level, on_device, fed, peak))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"{args.model}, {args.crop}x{args.crop}, batch {args.batch}, {args.steps} steps on {name}"
        f"{' (compiled)' if args.compile else ''}{' (channels-last)' if args.channels_last else ''}:",
        "| AMP | img/s, tensors on device | img/s, data pipeline | pipeline cost | peak GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for level, on_device, fed, peak in rows:
        lines.append(f"| {level} | {on_device:.2f} | {fed:.2f} | {1 - fed / on_device:.1%} | {peak:.1f} |")
    by_level = {level: on_device for level, on_device, _, _ in rows}
    if "O0" in by_level and "O2" in by_level:
        lines.append(f"\nbf16 (O2) vs fp32 (O0): {by_level['O2'] / by_level['O0']:.2f}x the images/s")
    heading = "where one O2 step's time goes:" if device.type == "cuda" else "where one step's time goes:"
    lines += ["", heading, profile_summary(args, device, num_classes)]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
