"""Decoding shard rows into tensors, and the joint image + mask transforms for training and evaluation.

Transforms are torchvision ``transforms.v2`` pipelines over ``tv_tensors.Image`` and ``tv_tensors.Mask``, so
geometry is applied to both (bilinear for the image, nearest for the mask) and photometric steps only to the
image. Every random draw comes from torch's global RNG; :func:`seeded` pins it for one sample so that a
sample's augmentation depends only on ``(seed, epoch, sample)``, never on worker count or order.

Usage::

    transform = build_train_transform(769)
    image, mask = decode_sample(row["image"], row["label"])
    with seeded(sample_seed(0, epoch, row["sample_id"])):
        image, mask = transform(image, mask)  # (3, 769, 769) float32, (769, 769) int64
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_png
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.data.images import decode_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (image, mask) -> (image, mask); what the readers accept as ``transform``.
JointTransform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[torch.Tensor, torch.Tensor]]


# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not in our stack); they still work
# with the pinned version, and the warning on every decoded sample would bury real warnings.
_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


def _as_uint8_tensor(data: bytes) -> torch.Tensor:
    # bytearray: torch.frombuffer warns on (and must not alias) read-only buffers such as Arrow's bytes.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_sample(image_bytes: bytes, label_bytes: bytes) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """Decode one shard row.

    Args:
        image_bytes: the image file, decoded by :func:`pipeline.data.images.decode_rgb` (8/16-bit, gray,
            RGBA, palette: all become 8-bit RGB, as ``ccnet predict`` reads files).
        label_bytes: a single-channel 8-bit PNG of train ids.

    Returns:
        image: (3, H, W) uint8.
        mask: (H, W) uint8 train ids.

    Raises:
        ValueError: undecodable bytes, a label that is not single-channel 8-bit, or sizes that differ.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CODEC_DEPRECATION, category=DeprecationWarning)
        return _decode(image_bytes, label_bytes)


def _decode(image_bytes: bytes, label_bytes: bytes) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    image = torch.from_numpy(decode_rgb(image_bytes)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)
    try:
        # UNCHANGED, not GRAY: a grey conversion would turn a palette label's indices into luminance.
        label = decode_png(_as_uint8_tensor(label_bytes), mode=ImageReadMode.UNCHANGED)
    except RuntimeError as error:
        raise ValueError(f"undecodable label PNG ({error})") from None
    if label.shape[0] != 1 or label.dtype != torch.uint8:
        raise ValueError(
            f"label must be a single-channel 8-bit PNG, got {label.shape[0]} channels of {label.dtype}"
        )
    if label.shape[1:] != image.shape[1:]:
        raise ValueError(f"label is {tuple(label.shape[1:])} but image is {tuple(image.shape[1:])} (H, W)")
    return tv_tensors.Image(image), tv_tensors.Mask(label[0])  # (1, H, W) -> (H, W)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range``, relative to the input's own size.

    Both axes use the same factor. Images are resized bilinearly with antialiasing; masks always use nearest
    (torchvision's mask kernel enforces it). Output size is ``round(H * s), round(W * s)``, at least 1.
    """

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (float(low), float(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        scale = low + float(torch.rand(())) * (high - low)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        return {"size": size, "scale": scale}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.resize, inpt, size=params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=True
        )


def _to_float_and_normalize(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        # scale=True applies to the image only (uint8 -> [0, 1]); the mask just becomes int64 class ids.
        v2.ToDtype(
            {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True
        ),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def build_train_transform(
    crop_size: int | tuple[int, int],
    scale_range: tuple[float, float] = (0.75, 2.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
    hflip: bool = True,
) -> v2.Compose:
    """Random scale, random crop (padding as needed), horizontal flip, then float + normalise.

    Args:
        crop_size: output (h, w), or one int for a square crop.
        scale_range: bounds of the uniform resize factor, relative to the input's size.
        mean, std: per-channel normalisation of the [0, 1] image.
        ignore_index: mask value written where the crop pads past the scaled image (the image gets 0).
        hflip: flip both with probability 0.5.

    Returns:
        A transform ``(image (3, H, W) uint8, mask (H, W)) -> (image (3, h, w) float32, mask (h, w) int64)``.
    """
    crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    steps: list[v2.Transform] = [
        RandomScale(scale_range),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps + _to_float_and_normalize(mean, std))


def build_eval_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """``image -> (image / 255 - mean) / std`` as float32 (3, H, W); mask -> int64 (H, W); no geometry."""
    return v2.Compose(_to_float_and_normalize(mean, std))


def sample_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (e.g. base seed, epoch, sample id), equal in every process.

    Python's ``hash`` of a str is salted per process, so it cannot be used across workers.
    """
    key = "\x1f".join(f"{type(part).__name__}:{part}" for part in parts)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's (CPU) and Python's global RNGs seeded by ``seed``, restoring them after."""
    python_state = random.getstate()
    # devices=[]: the transforms run on CPU; forking CUDA RNGs would initialise CUDA in data workers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
