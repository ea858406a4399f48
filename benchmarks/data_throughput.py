"""Data pipeline throughput at Cityscapes size: Parquet shards vs a folder of PNG files, and preparation.

    python benchmarks/data_throughput.py                  # 12 images of 1024x2048, 769x769 crops
    python benchmarks/data_throughput.py --images 24 --out s3://bucket/bench   # shards on S3 (AWS_* env)

Writes synthetic street-like images (smooth regions plus noise, so PNGs compress like photos) in the
Cityscapes layout, prepares them into shards (preparation throughput), then reads every image in one
process (so the figures are per core) with the same decode + training augmentation (random scale 0.75-2.0,
769 crop, flip, normalise) from the shards and from the PNG folder, side by side.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from pipeline.data.readers import ShardDataset
from pipeline.data.sources import build_source
from pipeline.data.transforms import build_train_transform, sample_seed, seeded
from pipeline.data.writer import write_shards


def make_cityscapes(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """``count`` train images + labelIds in the Cityscapes layout (city 'bench')."""
    rng = np.random.default_rng(seed)
    images = root / "leftImg8bit" / "train" / "bench"
    labels = root / "gtFine" / "train" / "bench"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    height, width = size
    for index in range(count):
        # Regions of constant colour and label (blocks of 128 px) with mild noise: photo-like compression.
        blocks = rng.integers(0, 256, (height // 128 + 1, width // 128 + 1, 3), dtype=np.uint8)
        image = np.kron(blocks, np.ones((128, 128, 1), dtype=np.uint8))[:height, :width]
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        ids = rng.choice(np.array([7, 8, 11, 21, 23, 24, 26]), size=blocks.shape[:2]).astype(np.uint8)
        label = np.kron(ids, np.ones((128, 128), dtype=np.uint8))[:height, :width]
        stem = f"bench_{index:06d}_000019"
        Image.fromarray(image).save(images / f"{stem}_leftImg8bit.png")
        Image.fromarray(label, mode="L").save(labels / f"{stem}_gtFine_labelIds.png")


def read_folder(root: Path, transform: torch.nn.Module, seed: int) -> int:
    """Read, map, decode and augment every PNG pair of the folder; returns the number read."""
    source = build_source("cityscapes", root)
    count = 0
    for ref in source.samples("train"):
        data = torch.frombuffer(bytearray((root / ref.image).read_bytes()), dtype=torch.uint8)
        image = tv_tensors.Image(decode_image(data, mode=ImageReadMode.RGB))
        # The raw labelIds still need the id mapping, as in any folder loader.
        mapped = source.map_label(np.array(Image.open(root / str(ref.label))), str(ref.label))
        mask = tv_tensors.Mask(torch.from_numpy(mapped))
        with seeded(sample_seed(seed, 0, ref.sample_id)):
            transform(image, mask)
        count += 1
    return count


def read_shards(uri: str, transform: torch.nn.Module, seed: int) -> int:
    dataset = ShardDataset(uri, "train", transform=transform, seed=seed)
    for index in range(len(dataset)):
        dataset[index]
    return len(dataset)


def timed(fn, *args) -> tuple[int, float]:  # noqa: ANN001 - any callable and its arguments
    start = time.perf_counter()
    count = fn(*args)
    return count, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--crop", type=int, default=769)
    parser.add_argument("--out", help="where the shards go (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # per-core figures
    out = sys.stdout
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "cityscapes"
        make_cityscapes(root, args.images, (args.height, args.width))
        disk = sum(p.stat().st_size for p in root.rglob("*.png"))
        source = build_source("cityscapes", root)
        shards_root = args.out or str(Path(folder) / "shards")
        start = time.perf_counter()
        uri, manifest = write_shards(source, shards_root, splits=["train"], workers=1, progress=False)
        prepare_s = time.perf_counter() - start
        transform = build_train_transform(args.crop)
        read_shards(uri, transform, 0)  # warm-up: imports, caches
        shard_n, shard_s = timed(read_shards, uri, transform, 1)
        folder_n, folder_s = timed(read_folder, root, transform, 1)
    mib = sum(s.bytes for s in manifest.shards) / 2**20
    out.write(
        f"{args.images} images {args.width}x{args.height} ({disk / 2**20 / args.images:.1f} MiB PNG each), "
        f"{args.crop} crops, 1 process, torch threads 1\n\n"
        f"{'path':<40}{'images/s':>10}{'s/image':>10}{'/folder':>9}\n{'-' * 69}\n"
        f"{'shards: read + verify + decode + augment':<40}{shard_n / shard_s:>10.2f}"
        f"{shard_s / shard_n:>10.3f}"
        f"{(shard_n / shard_s) / (folder_n / folder_s):>9.2f}\n"
        f"{'PNG folder: read + map + decode + augment':<40}{folder_n / folder_s:>10.2f}"
        f"{folder_s / folder_n:>10.3f}{1.0:>9.2f}\n"
        f"{'preparation (1 process)':<40}{args.images / prepare_s:>10.2f}{prepare_s / args.images:>10.3f}\n\n"
        f"shards: {len(manifest.shards)} files, {mib:.1f} MiB\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
