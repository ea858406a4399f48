"""Fixtures of the pipeline tests: one small picture encoded in every image mode the decoder handles."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

HEIGHT, WIDTH = 6, 8


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of ``values``, (H, W, 3) RGB or (H, W, 4) RGBA uint16, encoded here: PIL writes none."""
    height, width, channels = values.shape
    color_type = {3: 2, 4: 6}[channels]
    # Each row: filter byte 0 (none), then big-endian samples.
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def encode_png16() -> Callable[[np.ndarray], bytes]:
    """:func:`png16`: a 16-bit RGB or RGBA PNG of uint16 values."""
    return png16


def _encode(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def image_modes() -> dict[str, tuple[bytes, np.ndarray]]:
    """``{case: (encoded file, the (H, W, 3) uint8 RGB picture it holds)}``, one case per image mode.

    Two pictures: a colour one (RGB, 16-bit RGB, RGBA, 16-bit RGBA, palette) and a gray one (L, 16-bit gray
    as I;16 and as 32-bit I, gray + alpha). A 16-bit file holds ``v * 256 + noise`` for the 8-bit value ``v``
    (noise below 256), so its high bytes are the 8-bit picture; alpha varies and is not part of the picture.
    """
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    colour[0, :3] = [(0, 0, 0), (255, 255, 255), (255, 0, 128)]  # the extremes are in it
    gray = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    gray[0, :2] = (0, 255)
    alpha = rng.integers(0, 256, (HEIGHT, WIDTH, 1), dtype=np.uint8)

    def sixteen(values: np.ndarray) -> np.ndarray:
        return values.astype(np.uint16) * 256 + rng.integers(0, 256, values.shape, dtype=np.uint16)

    # Palette: every colour of the picture once, each pixel its colour's index.
    colours, indices = np.unique(colour.reshape(-1, 3), axis=0, return_inverse=True)
    palette = Image.frombytes("P", (WIDTH, HEIGHT), indices.astype(np.uint8).tobytes())
    palette.putpalette(colours.astype(np.uint8).tobytes())
    gray_rgb = np.repeat(gray[..., None], 3, axis=2)  # (H, W) -> (H, W, 3)
    return {
        "RGB": (_encode(Image.fromarray(colour)), colour),
        "RGB 16-bit": (png16(sixteen(colour)), colour),
        "RGBA": (_encode(Image.fromarray(np.concatenate([colour, alpha], axis=2))), colour),
        "RGBA 16-bit": (png16(np.concatenate([sixteen(colour), sixteen(alpha)], axis=2)), colour),
        "P": (_encode(palette), colour),
        "L": (_encode(Image.fromarray(gray)), gray_rgb),
        "I;16": (_encode(Image.fromarray(sixteen(gray))), gray_rgb),
        "I": (_encode(Image.fromarray(sixteen(gray).astype(np.int32)), "TIFF"), gray_rgb),
        "LA": (_encode(Image.fromarray(np.concatenate([gray[..., None], alpha], axis=2))), gray_rgb),
    }
