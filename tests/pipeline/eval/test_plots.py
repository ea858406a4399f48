"""Figures and colour maps: shapes of the figures, colours and blends against hand-computed values."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pipeline.eval.plots import (
    attention_diagnostics_figure,
    attention_maps_figure,
    colorize,
    confusion_matrix_figure,
    overlay,
    overlay_figure,
)

PALETTE = ((10, 20, 30), (40, 50, 60), (200, 0, 100))


def _renders(figure: Figure) -> bool:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue().startswith(b"\x89PNG")


def test_colorize_maps_ids_to_palette_and_void_to_black() -> None:
    label = np.array([[0, 1], [255, 2]])
    expected = np.array([[[10, 20, 30], [40, 50, 60]], [[0, 0, 0], [200, 0, 100]]], dtype=np.uint8)
    out = colorize(label, PALETTE, ignore_index=255)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(colorize(torch.from_numpy(label), PALETTE), expected)


def test_colorize_rejects_ids_without_a_colour() -> None:
    with pytest.raises(ValueError, match="label id 3"):
        colorize(np.array([[0, 3]]), PALETTE, ignore_index=255)


def test_overlay_blends_and_keeps_void_pixels() -> None:
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    label = np.array([[2, 2], [255, 0]])
    out = overlay(image, label, PALETTE, alpha=0.5, ignore_index=255)
    np.testing.assert_array_equal(out[0, 0], [150, 50, 100])  # (100 + (200, 0, 100)) / 2
    np.testing.assert_array_equal(out[1, 0], [100, 100, 100])  # void: the image
    np.testing.assert_array_equal(out[1, 1], [55, 60, 65])
    np.testing.assert_array_equal(overlay(image, label, PALETTE, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, label, PALETTE, alpha=1.0)[0, 0], PALETTE[2])


def test_confusion_matrix_figure_is_row_normalised_and_annotated() -> None:
    confusion = torch.tensor([[6, 2, 0], [0, 0, 0], [1, 1, 2]])  # class 1 never in the ground truth
    figure = confusion_matrix_figure(confusion, ["road", "car", "sky"])
    assert isinstance(figure, Figure) and len(figure.axes) == 2  # the matrix and its colour bar
    shown = np.asarray(figure.axes[0].images[0].get_array())
    np.testing.assert_allclose(shown, [[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    assert sorted(t.get_text() for t in figure.axes[0].texts)[-1] == "0.75"
    assert len(figure.axes[0].texts) == 9
    assert _renders(figure)


def test_confusion_matrix_figure_skips_numbers_for_many_classes() -> None:
    figure = confusion_matrix_figure(np.eye(30, dtype=np.int64), [f"c{i}" for i in range(30)])
    assert len(figure.axes[0].texts) == 0


def test_confusion_matrix_figure_checks_names() -> None:
    with pytest.raises(ValueError, match="2 class names"):
        confusion_matrix_figure(np.eye(3), ["a", "b"])


@pytest.mark.parametrize("with_labels, columns", [(True, 3), (False, 2)])
def test_overlay_figure_has_one_row_per_sample(with_labels: bool, columns: int) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in range(2)]
    predictions = [rng.integers(0, 3, (8, 12)) for _ in range(2)]
    labels = [np.where(p == 0, 255, p) for p in predictions] if with_labels else None
    figure = overlay_figure(images, predictions, labels, PALETTE, ignore_index=255)
    assert len(figure.axes) == 2 * columns
    shown = figure.axes[1].images[0].get_array()  # row 0, the prediction overlaid
    np.testing.assert_array_equal(shown, overlay(images[0], predictions[0], PALETTE))
    assert _renders(figure)


def test_overlay_figure_names_the_run_and_shows_the_class_colours() -> None:
    images = [np.zeros((8, 12, 3), dtype=np.uint8)]
    predictions = [np.zeros((8, 12), dtype=np.int64)]
    figure = overlay_figure(
        images,
        predictions,
        predictions,
        PALETTE,
        class_names=["road", "car", "sky"],
        title="quickstart: val, single-scale",
    )
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["road", "car", "sky"]
    colours = [tuple(round(c * 255) for c in patch.get_facecolor()[:3]) for patch in legend.get_patches()]
    assert colours == [tuple(colour) for colour in PALETTE]
    assert figure.get_suptitle() == "quickstart: val, single-scale"
    assert _renders(figure)
    titled = confusion_matrix_figure(np.eye(3), ["road", "car", "sky"], title="run: val, ms+flip")
    assert titled.axes[0].get_title() == "run: val, ms+flip"


def test_attention_maps_figure_one_row_per_pixel_maps_over_the_image() -> None:
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    maps = np.random.default_rng(0).random((2, 3, 4, 6))  # R=2, P=3 at 1/8 resolution
    pixels = [(4, 4), (16, 24), (30, 47)]
    figure = attention_maps_figure(image, maps, pixels)
    assert len(figure.axes) == 3 * (1 + 2)
    first_map = figure.axes[1].images[1]
    assert first_map.get_extent() == [-0.5, 47.5, 31.5, -0.5]  # stretched over the whole image
    np.testing.assert_allclose(first_map.get_array(), maps[0, 0] / maps[0, 0].max(), rtol=1e-6)
    marker = figure.axes[3].lines[0]  # second row: its pixel, marked at (x=col, y=row)
    assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (24, 16)
    assert _renders(figure)


def test_attention_maps_figure_checks_pixel_count() -> None:
    with pytest.raises(ValueError, match="P=2"):
        attention_maps_figure(np.zeros((8, 8, 3), np.uint8), np.ones((2, 3, 2, 2)), [(0, 0), (1, 1)])


def test_attention_diagnostics_figure_one_line_per_place_over_the_iterations() -> None:
    history = [
        (
            iteration,
            {
                f"attention/{place}/{name}": iteration / 100 + offset
                for place, offset in (("head", 0.0), ("stem", 1.0))
                for name in ("gamma", "share", "entropy_normalised", "distance")
            },
        )
        for iteration in (10, 20, 30)
    ]
    history[0][1]["val/mIoU"] = 0.5  # not a diagnostic: ignored
    figure = attention_diagnostics_figure(history, threshold=0.05, title="run")
    assert len(figure.axes) == 4
    share = figure.axes[1]
    lines = {line.get_label(): line for line in share.lines}
    assert set(lines) == {"head", "stem", "engaged (0.05)"}
    np.testing.assert_array_equal(lines["head"].get_xdata(), [10, 20, 30])
    np.testing.assert_allclose(lines["stem"].get_ydata(), [1.1, 1.2, 1.3])
    assert list(lines["engaged (0.05)"].get_ydata()) == [0.05, 0.05]
    assert _renders(figure)
    with pytest.raises(ValueError, match="no attention diagnostics"):
        attention_diagnostics_figure([(10, {"val/mIoU": 0.5})], threshold=0.05)
