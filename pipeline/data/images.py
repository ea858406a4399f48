"""The one image decoder: training and evaluation (shard rows), ``ccnet predict`` (files), dataset
preparation (its check) and sample grids all turn an image into (H, W, 3) uint8 RGB here, the same way.

By PIL mode of the decoded file:

- ``RGB``: as is. 16-bit-per-channel PNGs arrive as RGB already: PIL keeps each value's high byte (v >> 8).
- ``I;16`` (and ``I;16B``/``I;16L``), ``I``: 16-bit gray, ``v >> 8`` like 16-bit RGB, replicated to three
  channels. ``I`` holds 32-bit integers; values are clipped to 0..65535 first.
- ``L``, ``1``: gray, replicated to three channels.
- ``P``: through its palette; a transparent index keeps its palette colour.
- ``RGBA``, ``LA``, ``PA``, ``RGBa``: the alpha channel is dropped, not blended onto a background, so a
  pixel's colour does not depend on how transparent it is.
- ``CMYK``, ``YCbCr`` and other modes PIL converts to RGB: PIL's conversion.
- ``F`` (32-bit float): refused, since its range is not known.

EXIF orientation is not applied: labels are stored unrotated, and the image must match them pixel for pixel.

Its inverse for labels lives here too: :func:`colorize` paints class ids in a palette's colours (sample
grids, predicted masks, plots), without matplotlib.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> np.ndarray:
    """An opened image as (H, W, 3) uint8 RGB, by the rules of this module's docstring.

    Raises:
        ValueError: a mode with no agreed conversion (``F``, or one PIL cannot convert to RGB).
    """
    if image.mode in _SIXTEEN_BIT:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)  # (H, W)
        gray = (values >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)  # (H, W) -> (H, W, 3)
    if image.mode == "F":
        raise ValueError("32-bit float images (mode F) are not supported: their value range is not known")
    try:
        return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy shares it
    except ValueError as error:
        raise ValueError(f"mode {image.mode} cannot be converted to RGB ({error})") from None


def decode_rgb(data: bytes) -> np.ndarray:
    """An encoded image (any format PIL reads) as (H, W, 3) uint8 RGB.

    Raises:
        ValueError: ``undecodable image (...)`` with the cause.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb(image)
    except UnidentifiedImageError:  # its message names the in-memory buffer
        raise ValueError("undecodable image (not a format PIL can decode)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"undecodable image ({error})") from None


def read_rgb(path: Path) -> np.ndarray:
    """The image file at ``path`` as (H, W, 3) uint8 RGB.

    Raises:
        ValueError: naming ``path``: the file is missing or not a decodable image.
    """
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise ValueError(f"{path}: image file is missing") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path}: unreadable image ({error})") from None


def _array(values: Any) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (on any device), without importing torch."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def colorize(label: Any, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours: id ``k`` gets ``palette[k]``, ``ignore_index`` black.

    Raises:
        ValueError: an id other than ``ignore_index`` has no colour in ``palette`` (a wrong palette or
            label mapping, which a black pixel would hide).
    """
    label = _array(label).astype(np.int64)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    void = label == ignore_index
    unknown = (~void) & ((label < 0) | (label >= len(colours)))
    if unknown.any():
        ids = sorted(int(v) for v in np.unique(label[unknown]))
        raise ValueError(f"label id {ids[0]} has no colour in a palette of {len(colours)} (ids {ids[:10]})")
    out = colours[np.where(void, 0, label)]  # (H, W, 3)
    out[void] = 0
    return out
