"""Decoding and the joint train/eval transforms: shapes, mask values, padding, flips, scales, seeding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomScale,
    build_eval_transform,
    build_train_transform,
    decode_sample,
    seeded,
)

IGNORE = 255
MEAN = np.array(IMAGENET_MEAN).reshape(3, 1, 1)
STD = np.array(IMAGENET_STD).reshape(3, 1, 1)


def encode(array: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def make_sample(height: int = 20, width: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 noise and (H, W) uint8 labels 0..4 (no ignore pixels, so padding is recognisable)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8), rng.integers(
        0, 5, (height, width), np.uint8
    )


def decoded(height: int = 20, width: int = 30, seed: int = 0) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    image, label = make_sample(height, width, seed)
    return decode_sample(encode(image), encode(label))


def normalised(image_hwc: np.ndarray) -> np.ndarray:
    """The independent oracle: (x / 255 - mean) / std, (3, H, W) float64."""
    return (image_hwc.transpose(2, 0, 1) / 255.0 - MEAN) / STD


def test_decode_round_trip_rgb() -> None:
    image, label = make_sample()
    out_image, out_label = decode_sample(encode(image), encode(label))
    assert isinstance(out_image, tv_tensors.Image) and isinstance(out_label, tv_tensors.Mask)
    assert out_image.shape == (3, 20, 30) and out_image.dtype == torch.uint8
    assert out_label.shape == (20, 30)
    np.testing.assert_array_equal(out_image.numpy().transpose(1, 2, 0), image)  # (3,H,W) -> (H,W,3)
    np.testing.assert_array_equal(out_label.numpy(), label)


def test_decode_grayscale_and_rgba_become_rgb() -> None:
    image, label = make_sample()
    gray = image[..., 0]
    out, _ = decode_sample(encode(gray), encode(label))
    assert out.shape == (3, 20, 30)
    for channel in range(3):
        np.testing.assert_array_equal(out[channel].numpy(), gray)
    rgba = np.concatenate([image, np.full((20, 30, 1), 128, np.uint8)], axis=2)
    out, _ = decode_sample(encode(rgba), encode(label))
    np.testing.assert_array_equal(out.numpy().transpose(1, 2, 0), image)


def test_decode_jpeg_image() -> None:
    image, label = make_sample()
    out, _ = decode_sample(encode(image, "JPEG"), encode(label))
    assert out.shape == (3, 20, 30) and out.dtype == torch.uint8


def test_decode_rejects_rgb_label_and_size_mismatch() -> None:
    image, label = make_sample()
    with pytest.raises(ValueError, match="single-channel"):
        decode_sample(encode(image), encode(image))
    with pytest.raises(ValueError, match="label is"):
        decode_sample(encode(image), encode(label[:10]))
    with pytest.raises(ValueError, match="undecodable"):
        decode_sample(b"not an image", encode(label))


@pytest.mark.parametrize("crop", [16, (24, 40), (48, 64)])
def test_train_transform_shapes_and_mask_values(crop: int | tuple[int, int]) -> None:
    transform = build_train_transform(crop)
    crop_hw = (crop, crop) if isinstance(crop, int) else crop
    for seed in range(10):
        image, mask = decoded(seed=seed)
        with seeded(seed):
            out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, *crop_hw) and out_image.dtype == torch.float32
        assert out_mask.shape == crop_hw and out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE}


def test_train_transform_pads_with_ignore_index_and_zero_image() -> None:
    # 20x30 scaled by 0.5 is 10x15, smaller than the 16x16 crop in both dimensions.
    transform = build_train_transform(16, scale_range=(0.5, 0.5), ignore_index=IGNORE)
    image, mask = decoded()
    zero = torch.tensor(-MEAN / STD, dtype=torch.float32)  # an image value of 0 after normalisation, (3,1,1)
    for seed in range(5):
        with seeded(seed):
            out_image, out_mask = transform(image, mask)
        padded = out_mask == IGNORE
        assert padded.sum() >= 16 * 16 - 10 * 15
        # The real pixels form one rectangle no larger than the scaled image.
        rows, cols = torch.nonzero(~padded, as_tuple=True)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert height <= 10 and width <= 15 and (~padded).sum() == height * width
        expected = zero.expand(3, 16, 16)
        torch.testing.assert_close(out_image[:, padded], expected[:, padded], rtol=0, atol=1e-6)


def test_train_transform_flip_matches_manual_flip() -> None:
    # Scale 1 and a crop the image's size leave the flip as the only random step.
    transform = build_train_transform((20, 30), scale_range=(1.0, 1.0))
    image, mask = decoded()
    plain_image = torch.tensor(normalised(image.numpy().transpose(1, 2, 0)), dtype=torch.float32)
    plain_mask = mask.to(torch.int64)
    outcomes = []
    for seed in range(20):
        with seeded(seed):
            out_image, out_mask = transform(image, mask)
        flipped = torch.allclose(out_image, plain_image.flip(-1), atol=1e-5)
        if flipped:
            assert torch.equal(out_mask, plain_mask.flip(-1))
        else:
            torch.testing.assert_close(out_image, plain_image, rtol=0, atol=1e-5)
            assert torch.equal(out_mask, plain_mask)
        outcomes.append(flipped)
    assert 0 < sum(outcomes) < len(outcomes)


def test_no_flip_when_disabled() -> None:
    transform = build_train_transform((20, 30), scale_range=(1.0, 1.0), hflip=False)
    image, mask = decoded()
    for seed in range(8):
        with seeded(seed):
            _, out_mask = transform(image, mask)
        assert torch.equal(out_mask, mask.to(torch.int64))


def test_random_scale_draws_uniform_factors_in_range() -> None:
    scale = RandomScale((0.75, 2.0))
    image, mask = decoded(100, 60)
    heights = []
    for seed in range(300):
        with seeded(seed):
            out_image, out_mask = scale(image, mask)
        height, width = out_image.shape[1:]
        assert out_mask.shape == (height, width)
        assert 75 <= height <= 200
        assert abs(width / 60 - height / 100) <= 1 / 60 + 1 / 100  # one factor for both axes, up to rounding
        assert set(out_mask.unique().tolist()) <= set(range(5))  # nearest: no blended label ids
        heights.append(height / 100)
    factors = np.array(heights)
    assert factors.min() < 0.80 and factors.max() > 1.95
    assert abs(factors.mean() - 1.375) < 0.06  # mean of U(0.75, 2.0); std of the mean ~0.021


def test_seeded_is_deterministic_and_seed_dependent() -> None:
    transform = build_train_transform(16)
    image, mask = decoded()
    with seeded(7):
        first = transform(image, mask)
    torch.rand(5)  # disturb the global RNG in between: seeded must not depend on it
    with seeded(7):
        again = transform(image, mask)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = []
    for seed in range(8, 14):
        with seeded(seed):
            others.append(transform(image, mask)[0])
    assert not all(torch.equal(first[0], other) for other in others)


def test_seeded_restores_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(5):
        torch.rand(10)
    assert torch.equal(torch.rand(3), expected)


def test_eval_transform_normalises_exactly() -> None:
    image, label = make_sample()
    out_image, out_mask = build_eval_transform()(*decode_sample(encode(image), encode(label)))
    assert out_image.dtype == torch.float32 and out_mask.dtype == torch.int64
    np.testing.assert_allclose(out_image.numpy(), normalised(image), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out_mask.numpy(), label)

    mean, std = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
    out_image, _ = build_eval_transform(mean, std)(*decode_sample(encode(image), encode(label)))
    oracle = (image.transpose(2, 0, 1) / 255.0 - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1))
    np.testing.assert_allclose(out_image.numpy(), oracle, rtol=0, atol=1e-5)
