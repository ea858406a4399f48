"""``ccnet data prepare`` and ``ccnet data inspect``: datasets as versioned Parquet shards."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.cli.args import at_least, location
from pipeline.data.sources import SOURCES, build_source
from pipeline.io.paths import absolute_location, is_relative_path, overlap
from pipeline.io.redaction import redact

log = logging.getLogger("ccnet")

DATASETS = tuple(SOURCES)  # the dataset registry: a new source module is a new --dataset choice


def _parse_counts(text: str) -> dict[str, int]:
    """``train=200,val=50`` -> {"train": 200, "val": 50}."""
    try:
        counts = {split: int(count) for split, count in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected split=count[,split=count...], got {text!r}") from None
    if any(count < 1 for count in counts.values()):
        raise argparse.ArgumentTypeError(f"counts must be positive, got {text!r}")
    return counts


def _data_prepare(args: argparse.Namespace) -> int:
    # lazy: loaded only by this command (`ccnet --help` imports neither pyarrow nor torch)
    from pipeline.data.writer import write_shards
    from pipeline.io import storage

    out = absolute_location(args.out)
    if is_relative_path(args.out):
        log.info("--out: %s resolved to %s", args.out, out)
    options: dict[str, object] = {}
    if args.dataset == "generated":
        options = {"seed": args.seed, "image_size": (args.image_size, args.image_size)}
        if args.count:
            options["counts"] = args.count
    elif args.root is None:
        raise ValueError(f"--root is required for dataset {args.dataset!r}")
    version_dir = storage.join(out, args.dataset, args.version)
    if args.root is not None and overlap(version_dir, args.root):
        raise ValueError(
            f"--out: the version {redact(version_dir)} and --root {args.root} overlap: the "
            "command reads --root and must not write into it. Choose another --out"
        )
    source = build_source(args.dataset, args.root, **options)
    splits = args.splits.split(",") if args.splits else None
    uri, manifest = write_shards(
        source,
        out,
        version=args.version,
        splits=splits,
        max_shard_bytes=int(args.max_shard_mb * 2**20),
        workers=args.workers,
        skip_bad=args.skip_bad,
    )
    counts = ", ".join(f"{split} {count}" for split, count in manifest.counts.items())
    skipped = f", {len(manifest.skipped)} skipped" if manifest.skipped else ""
    sys.stdout.write(f"{uri}: {counts} samples in {len(manifest.shards)} shards{skipped}\n")
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)
    from pipeline.data.inspect import inspect_dataset

    report = inspect_dataset(args.uri, split=args.split, limit=args.limit, grid=args.grid)
    sys.stdout.write(report.format() + "\n")
    if args.grid:
        sys.stdout.write(f"sample grid: {args.grid}\n")
    return 0


def add_data_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="prepare and inspect datasets as Parquet shards")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    prepare = data_commands.add_parser("prepare", help="turn a downloaded dataset into shards")
    prepare.add_argument("--dataset", required=True, choices=DATASETS)
    prepare.add_argument("--root", help="the dataset as downloaded (not needed for 'generated')")
    prepare.add_argument(
        "--out", required=True, type=location, help="root URI: s3://bucket/prefix or a local folder"
    )
    prepare.add_argument("--version", default="v1", help="version name; a published version is immutable")
    prepare.add_argument("--splits", help="comma-separated splits (default: the dataset's train and val)")
    prepare.add_argument("--workers", type=at_least(1), default=None, help="processes (default: all cores)")
    prepare.add_argument(
        "--max-shard-mb", type=at_least(0.001, float), default=64.0, help="bound on a shard's size"
    )
    prepare.add_argument("--skip-bad", action="store_true", help="leave out bad samples, list them")
    prepare.add_argument("--seed", type=at_least(0), default=0, help="generated: random seed")
    prepare.add_argument(
        "--image-size", type=at_least(8), default=128, help="generated: image side in pixels"
    )
    prepare.add_argument("--count", type=_parse_counts, help="generated: e.g. train=200,val=50")
    prepare.set_defaults(run=_data_prepare)

    inspect = data_commands.add_parser("inspect", help="counts, class histogram and a sample grid")
    inspect.add_argument("uri", type=location, help="a dataset version, e.g. s3://bucket/datasets/camvid/v1")
    inspect.add_argument("--split", help="one split (default: all)")
    inspect.add_argument("--limit", type=at_least(1), help="samples read per split for the histogram")
    inspect.add_argument("--grid", type=location, help="save a PNG grid of samples with coloured labels here")
    inspect.set_defaults(run=_data_inspect)
