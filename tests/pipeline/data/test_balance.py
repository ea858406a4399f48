"""Class balance: pixel counts per class against a second reader, and SegNet's median-frequency weights
by hand and on the real CamVid train split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.balance import ClassPixels, class_pixels, median_frequency_weights
from pipeline.data.readers import ShardDataset, open_manifest

CAMVID = (Path(__file__).parents[3] / ".." / "shared" / "data" / "camvid").resolve()


def test_median_frequency_weights_by_hand() -> None:
    # freq = 10/100, 30/100, (never seen), 5/50 = 0.1, 0.3, -, 0.1; the median over the three seen is 0.1:
    # weights 0.1/0.1, 0.1/0.3, 0 for the class never seen, 0.1/0.1.
    counts = ClassPixels(np.array([10, 30, 0, 5]), np.array([100, 100, 0, 50]))
    assert median_frequency_weights(counts) == pytest.approx((1.0, 1 / 3, 0.0, 1.0))
    # An even count of classes: the median is the mean of the middle two, (0.1 + 0.3) / 2 = 0.2.
    even = ClassPixels(np.array([10, 30]), np.array([100, 100]))
    assert median_frequency_weights(even) == pytest.approx((2.0, 2 / 3))
    with pytest.raises(ValueError, match="no labelled pixel"):
        median_frequency_weights(ClassPixels(np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)))


def test_class_pixels_agree_with_the_dataset_read_sample_by_sample(generated_dataset) -> None:
    uri = generated_dataset(size=32, train=6, val=2)
    manifest = open_manifest(uri)
    counts = class_pixels(uri, manifest, "train")
    pixels = np.zeros(manifest.num_classes, dtype=np.int64)
    image_pixels = np.zeros(manifest.num_classes, dtype=np.int64)
    for item in ShardDataset(uri, "train", manifest=manifest):  # no transform: the stored label
        label = item["label"].numpy()
        for c in range(manifest.num_classes):
            n = int((label == c).sum())
            pixels[c] += n
            image_pixels[c] += label.size if n else 0
    assert np.array_equal(counts.pixels, pixels) and np.array_equal(counts.image_pixels, image_pixels)
    assert counts.pixels.sum() > 0 and (counts.image_pixels >= counts.pixels).all()


# SegNet's published CamVid weights (SegNet-Tutorial, segnet_train.prototxt, class_weighting), in the
# SegNet class order this adapter keeps: Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car,
# Pedestrian, Bicyclist.
SEGNET = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614)


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"no CamVid copy at {CAMVID}")
def test_camvid_train_weights_are_segnets(tmp_path: Path) -> None:
    from pipeline.data.sources import build_source
    from pipeline.data.writer import write_shards

    uri, manifest = write_shards(
        build_source("camvid", CAMVID), str(tmp_path), splits=["train"], workers=1, progress=False
    )
    weights = median_frequency_weights(class_pixels(uri, manifest, "train"))
    ratio = dict(zip(manifest.classes, np.array(weights) / np.array(SEGNET), strict=True))
    # Ten of eleven within 25 % of SegNet's (most 2-11 % above: SegNet's median evidently counted the void
    # class as a twelfth, which lowers every weight alike); SignSymbol is 3.85 against 9.64, which no
    # definition tried reproduces from these labels (3.5-4.4 with void, with val, or both).
    assert ratio.pop("SignSymbol") == pytest.approx(0.40, abs=0.02)
    assert all(0.95 < r < 1.25 for r in ratio.values()), ratio
    named = dict(zip(manifest.classes, weights, strict=True))
    assert min(named[c] for c in ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")) > 3.0
    assert max(named[c] for c in ("Sky", "Building", "Road")) < 0.3
