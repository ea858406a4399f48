"""Class balance of a prepared split: per-class pixel counts and SegNet's median-frequency weights.

Median-frequency balancing (Eigen & Fergus, ICCV 2015; SegNet, Badrinarayanan et al., TPAMI 2017, which
trains CamVid with it) weighs class c's pixels in the loss by ``median(freq) / freq(c)``, where ``freq(c)`` is
the class's pixels divided by the pixels of the images in which it appears, and the median runs over the
classes the split holds. Thin, rare classes (CamVid's pole, sign, bicyclist) weigh several times more than
sky or road, which otherwise dominate the mean over pixels. A class the split never holds gets weight 0.

    counts = class_pixels(uri, manifest, "train")
    weights = median_frequency_weights(counts)
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.readers import read_shard
from pipeline.data.schema import Manifest


@dataclass(frozen=True)
class ClassPixels:
    """Per class of one split: its labelled pixels, and all the pixels of the images that hold it."""

    pixels: np.ndarray  # (K,) int64
    image_pixels: np.ndarray  # (K,) int64


def label_counts(label: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """One label map's pixels per class, (num_classes + 1,) int64, the last entry void (``ignore_index``)."""
    ids = np.where(label == ignore_index, num_classes, label)
    return np.bincount(ids.ravel(), minlength=num_classes + 1)


def class_pixels(uri: str, manifest: Manifest, split: str) -> ClassPixels:
    """Count ``split``'s label pixels per class over every sample of the dataset version at ``uri`` (its
    shards verified as they are read); void pixels count towards an image's size, not towards a class."""
    k = manifest.num_classes
    pixels = np.zeros(k, dtype=np.int64)
    image_pixels = np.zeros(k, dtype=np.int64)
    for shard in manifest.shards_of(split):
        for label_bytes in read_shard(uri, shard).column("label").to_pylist():
            label = np.asarray(Image.open(io.BytesIO(label_bytes)))
            counts = label_counts(label, k, manifest.ignore_index)[:k]
            pixels += counts
            image_pixels += np.where(counts > 0, label.size, 0)
    return ClassPixels(pixels, image_pixels)


def median_frequency_weights(counts: ClassPixels) -> tuple[float, ...]:
    """``median(freq) / freq(c)`` per class, ``freq(c) = pixels(c) / image_pixels(c)``; 0 for a class with
    no pixel. Raises ValueError when no class has a pixel (nothing to balance)."""
    present = counts.pixels > 0
    if not present.any():
        raise ValueError("no labelled pixel in the split: class weights need at least one")
    frequency = counts.pixels[present] / counts.image_pixels[present]
    weights = np.zeros(len(counts.pixels))
    weights[present] = np.median(frequency) / frequency
    return tuple(float(w) for w in weights)
