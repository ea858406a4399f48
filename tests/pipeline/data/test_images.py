"""pipeline.data.images: every image mode decodes to the 8-bit RGB picture it shows, in training and predict.

The pictures come from the ``image_modes`` fixture (tests/pipeline/conftest.py): each file is built from a
known 8-bit picture, which is the oracle.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import decode_rgb, read_rgb
from pipeline.data.transforms import decode_sample

MODES = ["RGB", "RGB 16-bit", "RGBA", "RGBA 16-bit", "P", "L", "I;16", "I", "LA"]


def encode(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def test_the_fixture_covers_every_mode(image_modes: dict[str, tuple[bytes, np.ndarray]]) -> None:
    assert sorted(image_modes) == sorted(MODES)
    opened = {}
    for case, (data, _) in image_modes.items():
        with Image.open(io.BytesIO(data)) as image:
            opened[case] = image.mode
    # 16-bit RGB(A) PNGs open as RGB(A): PIL keeps the high bytes itself.
    assert opened == {
        "RGB": "RGB",
        "RGB 16-bit": "RGB",
        "RGBA": "RGBA",
        "RGBA 16-bit": "RGBA",
        "P": "P",
        "L": "L",
        "I;16": "I;16",
        "I": "I",
        "LA": "LA",
    }


@pytest.mark.parametrize("case", MODES)
def test_every_mode_decodes_to_its_8_bit_picture(case: str, image_modes: dict, tmp_path: Path) -> None:
    data, picture = image_modes[case]
    out = decode_rgb(data)
    assert out.dtype == np.uint8 and out.shape == picture.shape
    np.testing.assert_array_equal(out, picture)
    path = tmp_path / "image"
    path.write_bytes(data)
    np.testing.assert_array_equal(read_rgb(path), picture)


@pytest.mark.parametrize("case", MODES)
def test_training_decodes_every_mode_like_predict(case: str, image_modes: dict) -> None:
    data, picture = image_modes[case]
    label = encode(Image.fromarray(np.zeros(picture.shape[:2], np.uint8)))
    image, _ = decode_sample(data, label)
    np.testing.assert_array_equal(image.numpy().transpose(1, 2, 0), picture)  # (3, H, W) -> (H, W, 3)


def test_16_bit_gray_keeps_the_high_byte_as_pil_does_for_16_bit_rgb(
    encode_png16: Callable[[np.ndarray], bytes],
) -> None:
    """The oracle is PIL's own reading of a 16-bit RGB PNG of the same values: gray must not differ from it
    (v >> 8, not round(v / 257): 511 is 1, not 2)."""
    values = np.array([[0, 255, 256, 511, 0x80FF, 65535]], np.uint16)
    gray = decode_rgb(encode(Image.fromarray(values)))  # mode I;16
    rgb = decode_rgb(encode_png16(np.repeat(values[..., None], 3, axis=2)))  # (1, 6) -> (1, 6, 3)
    np.testing.assert_array_equal(gray, rgb)
    np.testing.assert_array_equal(gray[..., 0], [[0, 0, 1, 1, 128, 255]])


def test_mode_i_is_clipped_to_16_bits() -> None:
    values = np.array([[-5, 0, 65535, 70000]], np.int32)
    out = decode_rgb(encode(Image.fromarray(values), "TIFF"))
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 255, 255]])


def test_bilevel_and_transparent_palette() -> None:
    bits = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    np.testing.assert_array_equal(decode_rgb(encode(bits)), [[[0, 0, 0], [255, 255, 255]]])
    palette = Image.frombytes("P", (2, 1), bytes([0, 1]))
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.info["transparency"] = 1  # index 1 transparent: its colour is kept, the alpha dropped
    np.testing.assert_array_equal(decode_rgb(encode(palette)), [[[10, 20, 30], [40, 50, 60]]])


def test_float_images_and_garbage_are_refused(tmp_path: Path) -> None:
    floats = encode(Image.fromarray(np.zeros((2, 2), np.float32)), "TIFF")
    with pytest.raises(ValueError, match=r"undecodable image \(32-bit float images \(mode F\)"):
        decode_rgb(floats)
    with pytest.raises(ValueError, match=r"undecodable image \(not a format PIL can decode\)"):
        decode_rgb(b"not an image")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"{tmp_path / 'broken.png'}: unreadable image"):
        read_rgb(tmp_path / "broken.png")
    with pytest.raises(ValueError, match=f"{tmp_path / 'missing.png'}: image file is missing"):
        read_rgb(tmp_path / "missing.png")
