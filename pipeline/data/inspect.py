"""Look at a prepared dataset: counts, class histogram, and a grid of samples with their coloured labels."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.balance import ClassPixels, label_counts, median_frequency_weights
from pipeline.data.images import colorize, decode_rgb
from pipeline.data.readers import open_manifest, read_shard
from pipeline.data.schema import Manifest
from pipeline.io import storage
from pipeline.io.outputs import check_targets, png_bytes


@dataclass(frozen=True)
class DatasetReport:
    """What ``ccnet data inspect`` prints: per-split counts, per-class pixel counts (void last) and the
    median-frequency weights ``train.class_weights`` would give them (:mod:`pipeline.data.balance`)."""

    manifest: Manifest
    pixels: dict[str, np.ndarray]  # split -> (num_classes + 1,) pixel counts, the last entry void
    samples_read: dict[str, int]
    image_pixels: dict[str, np.ndarray]  # split -> (num_classes,) pixels of the images holding each class

    def weights(self, split: str) -> tuple[float, ...] | None:
        """The median-frequency class weights of the samples read from ``split``; None without a pixel."""
        counts = ClassPixels(self.pixels[split][:-1], self.image_pixels[split])
        return median_frequency_weights(counts) if counts.pixels.any() else None

    def format(self) -> str:
        m = self.manifest
        lines = [
            f"{m.dataset} {m.version}: {m.num_classes} classes, ignore index {m.ignore_index}, "
            f"{len(m.shards)} shards, {sum(s.bytes for s in m.shards) / 2**20:.1f} MiB",
            "samples: " + ", ".join(f"{split} {count}" for split, count in m.counts.items()),
        ]
        if m.skipped:
            lines.append(f"skipped at preparation: {len(m.skipped)} (listed in the manifest)")
        for split, counts in self.pixels.items():
            total = max(int(counts.sum()), 1)
            weights = self.weights(split)
            lines.append(
                f"class pixels, {split} ({self.samples_read[split]} samples read)"
                + (", median-frequency weight:" if weights else ":")
            )
            names = [*m.classes, "(void)"]
            column = [*(weights or [None] * m.num_classes), None]
            rows = sorted(zip(names, counts.tolist(), column, strict=True), key=lambda item: -item[1])
            for name, count, weight in rows:
                lines.append(
                    f"  {name:<24}{count / total:>8.2%}" + (f"{weight:>9.3f}" if weight is not None else "")
                )
        return "\n".join(lines)


def inspect_dataset(
    uri: str,
    *,
    split: str | None = None,
    limit: int | None = None,
    grid: str | None = None,
    grid_rows: int = 4,
) -> DatasetReport:
    """Read a prepared dataset version: verify its shards, count class pixels, optionally save a grid.

    Args:
        uri: the dataset version (``.../<dataset>/<version>``), local or ``s3://``.
        split: one split, or every split when None.
        limit: read at most this many samples per split (the whole split when None).
        grid: where to save a PNG grid of the first ``grid_rows`` samples of the first split (image beside
            its coloured label), a local path or URI.
        grid_rows: samples in the grid.
    """
    manifest = open_manifest(uri)
    if grid:  # before anything is read: no grid inside the (immutable) version, none over a user's file
        check_targets([grid], [], "--grid", input_folders=[uri])
    splits = [split] if split else list(manifest.counts)
    pixels: dict[str, np.ndarray] = {}
    image_pixels: dict[str, np.ndarray] = {}
    read: dict[str, int] = {}
    tiles: list[np.ndarray] = []
    for name in splits:
        counts = np.zeros(manifest.num_classes + 1, dtype=np.int64)
        present = np.zeros(manifest.num_classes, dtype=np.int64)  # pixels of the images holding each class
        seen = 0
        for shard in manifest.shards_of(name):
            if limit is not None and seen >= limit:
                break
            table = read_shard(uri, shard)
            images, labels = table["image"].to_pylist(), table["label"].to_pylist()
            for image_bytes, label_bytes in zip(images, labels, strict=True):
                if limit is not None and seen >= limit:
                    break
                label = np.array(Image.open(io.BytesIO(label_bytes)))
                per_class = label_counts(label, manifest.num_classes, manifest.ignore_index)
                counts += per_class
                present += np.where(per_class[:-1] > 0, label.size, 0)
                seen += 1
                if grid and len(tiles) < grid_rows:
                    image = decode_rgb(image_bytes)  # (H, W, 3) uint8, as training sees it
                    colours = colorize(label, manifest.palette, manifest.ignore_index)
                    tiles.append(np.concatenate([image, colours], axis=1))  # (H, 2W, 3)
        pixels[name], read[name], image_pixels[name] = counts, seen, present
    if grid and tiles:
        width = max(tile.shape[1] for tile in tiles)
        padded = [np.pad(tile, ((0, 4), (0, width - tile.shape[1]), (0, 0))) for tile in tiles]
        storage.write_bytes(grid, png_bytes(np.concatenate(padded, 0), "data inspect"))
    return DatasetReport(manifest, pixels, read, image_pixels)
