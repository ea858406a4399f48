"""pipeline.eval.predict: a coloured mask and an overlay per image, colours where the fake model predicts
them.

The fake model predicts, at each pixel, the image's strongest colour channel (red 0, green 1, blue 2); with
mean 0 and std 1 the normalised image is just RGB / 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from ccnet.backbones import Normalization
from ccnet.models import build_ccnet
from pipeline.eval.evaluation import EvalProtocol
from pipeline.eval.predict import colorize, predict_images

PALETTE = ((10, 20, 30), (40, 50, 60), (70, 80, 90))
UNIT = {"normalization": Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}


class StrongestChannel(nn.Module):
    """Logits 10 * the input channels; records the training flag of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.training_flags: list[bool] = []

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.training_flags.append(self.training)
        return {"out": 10 * x}


def write_image(path: Path) -> np.ndarray:
    """A 4x6 RGB PNG: columns 0-1 red, 2-3 green, 4-5 blue, bottom row blue; returns its pixels."""
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, 0:2, 0] = 200
    rgb[:, 2:4, 1] = 180
    rgb[:, 4:6, 2] = 160
    rgb[3, :] = (0, 0, 250)
    Image.fromarray(rgb).save(path)
    return rgb


def expected_ids() -> np.ndarray:
    ids = np.repeat(np.array([[0, 0, 1, 1, 2, 2]]), 4, axis=0)
    ids[3, :] = 2
    return ids


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def test_writes_mask_and_overlay_in_palette_colours(tmp_path: Path) -> None:
    rgb = write_image(tmp_path / "street.png")
    out_dir = tmp_path / "out" / "nested"
    model = StrongestChannel().train()
    written = predict_images(
        model, [tmp_path / "street.png"], palette=PALETTE, out_dir=out_dir, progress=False, **UNIT
    )
    assert written == [out_dir / "street_mask.png", out_dir / "street_overlay.png"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["street_mask.png", "street_overlay.png"]

    mask = read(out_dir / "street_mask.png")
    ids = expected_ids()
    for class_id, colour in enumerate(PALETTE):
        assert (mask[ids == class_id] == colour).all()

    overlay = read(out_dir / "street_overlay.png").astype(int)
    blend = 0.5 * rgb.astype(int) + 0.5 * mask.astype(int)
    assert np.abs(overlay - blend).max() <= 0.5
    assert (overlay != rgb).any() and (overlay != mask).any()

    assert model.training and model.training_flags == [False]


def test_sliding_multiscale_flip_predicts_the_same_per_pixel(tmp_path: Path) -> None:
    write_image(tmp_path / "street.png")
    predict_images(
        StrongestChannel(),
        [tmp_path / "street.png"],
        palette=PALETTE,
        out_dir=tmp_path / "out",
        protocol=EvalProtocol("slide", 3, 2, (1.0, 2.0), True),
        progress=False,
        **UNIT,
    )
    mask = read(tmp_path / "out" / "street_mask.png")
    assert (mask == np.asarray(PALETTE, dtype=np.uint8)[expected_ids()]).all()


def test_fusion_reaches_the_inference(tmp_path: Path) -> None:
    write_image(tmp_path / "street.png")
    for fusion in ("logits", "probs"):
        predict_images(
            StrongestChannel(),
            [tmp_path / "street.png"],
            palette=PALETTE,
            out_dir=tmp_path / fusion,
            progress=False,
            **UNIT,
            protocol=EvalProtocol(scales=(1.0, 2.0), flip=True, fusion=fusion),
        )
        mask = read(tmp_path / fusion / "street_mask.png")
        assert (mask == np.asarray(PALETTE, dtype=np.uint8)[expected_ids()]).all()
    with pytest.raises(ValueError, match="fusion"):  # passed on, not dropped
        predict_images(
            StrongestChannel(),
            [tmp_path / "street.png"],
            palette=PALETTE,
            out_dir=tmp_path / "x",
            protocol=EvalProtocol(fusion="votes"),
            progress=False,
            **UNIT,
        )


def test_unreadable_image_raises_naming_it_and_writes_nothing_for_it(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    write_image(tmp_path / "later.png")
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="broken.png"):
        predict_images(
            StrongestChannel(),
            [tmp_path / n for n in ("good.png", "broken.png", "later.png")],
            palette=PALETTE,
            out_dir=out_dir,
            progress=False,
            **UNIT,
        )
    assert sorted(p.name for p in out_dir.iterdir()) == ["good_mask.png", "good_overlay.png"]
    with pytest.raises(ValueError, match="missing.png"):
        predict_images(
            StrongestChannel(), [tmp_path / "missing.png"], palette=PALETTE, out_dir=out_dir, progress=False
        )


def test_inputs_sharing_a_stem_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="street"):
        predict_images(
            StrongestChannel(),
            [tmp_path / "a" / "street.png", tmp_path / "b" / "street.jpg"],
            palette=PALETTE,
            out_dir=tmp_path / "out",
            progress=False,
        )


def test_colorize_paints_void_black_and_refuses_unknown_ids() -> None:
    ids = np.array([[0, 1], [2, 255]])
    rgb = colorize(ids, PALETTE, ignore_index=255)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb.tolist() == [[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [0, 0, 0]]]
    with pytest.raises(ValueError, match=r"\[3\]"):
        colorize(np.array([[3]]), PALETTE)


def test_ccnet_tiny_with_imagenet_normalisation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(
        tmp_path / "noise.jpg"
    )
    written = predict_images(
        build_ccnet("ccnet_tiny", num_classes=3),
        [tmp_path / "noise.jpg"],
        palette=PALETTE,
        out_dir=tmp_path / "out",
        progress=False,
    )
    mask = read(written[0])
    assert mask.shape == (24, 40, 3)
    assert {tuple(colour) for colour in mask.reshape(-1, 3)} <= set(PALETTE)


class InputRecorder(StrongestChannel):
    """:class:`StrongestChannel` that keeps a copy of every input it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.inputs.append(x.detach().clone())
        return super().forward(x)


IMAGE_MODES = ["RGB", "RGB 16-bit", "RGBA", "RGBA 16-bit", "P", "L", "I;16", "I", "LA"]


@pytest.mark.parametrize("case", IMAGE_MODES)
def test_every_image_mode_is_predicted_from_its_8_bit_picture(
    case: str, image_modes: dict[str, tuple[bytes, np.ndarray]], tmp_path: Path
) -> None:
    """The model is given the 8-bit picture the file holds (16-bit: the high bytes; gray: three equal
    channels; alpha dropped; palette: its colours), and the outputs are those of the picture's 8-bit RGB
    PNG."""
    data, picture = image_modes[case]
    (tmp_path / "picture.img").write_bytes(data)  # PIL goes by the content, not the name
    Image.fromarray(picture).save(tmp_path / "reference.png")
    model = InputRecorder()
    out_dir = tmp_path / "out"
    predict_images(
        model,
        [tmp_path / "picture.img", tmp_path / "reference.png"],
        palette=PALETTE,
        out_dir=out_dir,
        progress=False,
        **UNIT,
    )
    seen = model.inputs[0][0].permute(1, 2, 0).numpy() * 255  # (1, 3, H, W) -> (H, W, 3), back to 0..255
    np.testing.assert_allclose(seen, picture, atol=1e-3)
    for suffix in ("mask", "overlay"):
        np.testing.assert_array_equal(
            read(out_dir / f"picture_{suffix}.png"), read(out_dir / f"reference_{suffix}.png")
        )
