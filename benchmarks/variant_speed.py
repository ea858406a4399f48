"""What each variant of an ablation costs to train, measured side by side in one run on this machine.

    python benchmarks/variant_speed.py -c configs/ablation_lite0-d16_camvid-320x320_1000it-h10_cpu.yaml
    python benchmarks/variant_speed.py -c configs/ablation_ccnet-tiny_generated-256x256_cpu.yaml --rounds 2

For every variant of the config's ``tune.variants`` it builds the model, optimiser (parameter groups) and loss
of that variant's config, then times training steps (``pipeline.train.loop.train_step`` at ``train.amp``, a
batch of ``data.batch_size`` random ``data.crop_size`` crops already in memory: no data pipeline) in
interleaved rounds, variant after variant, so that a machine slowing down mid-run slows every variant alike.
It prints the median images/s of each, the ratio to ``tune.baseline`` (or the first variant), and the
forward GFLOPs of one crop, the attention's alone beside them (counted, not timed). A search's own
``train/median_images_per_second`` is measured trial by trial, hours apart, beside whatever else ran then;
this is the figure to compare variants by.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from pipeline.config import load_config
from pipeline.config.model import build_model
from pipeline.train import ablation
from pipeline.train.build import build_loss, build_optimizer
from pipeline.train.loop import AMP_DTYPES, train_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="an ablation's YAML config (tune.variants)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="data.batch_size=4")
    parser.add_argument("--num-classes", type=int, default=11, help="classes of the head (CamVid: 11)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, every variant in each")
    parser.add_argument("--steps", type=int, default=2, help="timed steps of a variant in a round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant first")
    args = parser.parse_args(argv)

    config = load_config(args.config, args.set)
    variants = ablation.variant_configs(config)
    if not variants:
        parser.error(f"{args.config}: tune.variants is empty")
    baseline = config.tune.baseline or next(iter(variants))
    crop, batch = config.data.crop_size, config.data.batch_size
    dtype = AMP_DTYPES[config.train.amp]
    torch.manual_seed(0)
    images = torch.randn(batch, 3, crop, crop)
    labels = torch.randint(0, args.num_classes, (batch, crop, crop))
    built = {}
    for name, variant in variants.items():
        model = build_model(variant, args.num_classes, pretrained=False).train()  # same arithmetic, no files
        scaler = torch.amp.GradScaler("cpu", enabled=False)  # O1 (float16) is for GPUs
        parts = (model, build_loss(variant, 255), build_optimizer(variant, model), scaler)
        for _ in range(args.warmup):
            train_step(*parts[:1], images, labels, *parts[1:], dtype)
        built[name] = parts
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (model, loss, optimizer, scaler) in built.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, images, labels, loss, optimizer, scaler, dtype)
            rates[name].append(args.steps * batch / (time.perf_counter() - start))

    size = (crop, crop)
    lines = [
        f"{config.model.name} variants, {crop}x{crop} crops, batch {batch}, amp {config.train.amp}, "
        f"{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads:",
        f"| variant | img/s (median) | img/s per round | vs {baseline} | GFLOPs | attention GFLOPs |",
        "|---|---:|---|---:|---:|---:|",
    ]
    reference = statistics.median(rates[baseline])
    for name, variant in variants.items():
        cost = ablation.variant_cost(variant, args.num_classes, size)
        median = statistics.median(rates[name])
        rounds = " / ".join(f"{rate:.2f}" for rate in rates[name])
        lines.append(
            f"| {name} | {median:.2f} | {rounds} | {median / reference:.2f}x | {cost.gflops:.2f} | "
            f"{cost.attention_gflops:.3f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
