"""Figures for the run record: confusion matrix, predictions over images, criss-cross attention maps, the
attention diagnostics over a run, and an ablation's mIoU per variant (95 % intervals, paired differences to a
baseline) beside its attention cost.

Every function returns a ``matplotlib.figure.Figure`` drawn on the Agg canvas and writes no file
(``Tracker.log_figure`` stores it). Figures are built without ``pyplot``, so nothing is kept in pyplot's
global registry and no display is needed; they are freed like any object. Images are (H, W, 3) uint8,
label maps (H, W) integer class ids with ``ignore_index`` for void; arrays may also be torch tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline.data.images import colorize

_ANNOTATE_UP_TO = 20  # classes; beyond that the numbers no longer fit their cells
_PANEL_INCHES = 3.0


def _array(values: Any) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (on any device), without importing torch."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _figure(rows: int, cols: int, panel_inches: float = _PANEL_INCHES) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows`` x ``cols`` axes (always a 2-D array) on the Agg canvas."""
    figure = Figure(figsize=(cols * panel_inches, rows * panel_inches), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def overlay(
    image: Any, label: Any, palette: Sequence[Sequence[int]], alpha: float = 0.5, ignore_index: int = 255
) -> np.ndarray:
    """``image`` with the colours of ``label`` blended in: ``(1 - alpha) * image + alpha * colour`` per
    pixel, rounded; void pixels keep the image. Both are (H, W, ...) of the same size; returns (H, W, 3)
    uint8."""
    image = _array(image)
    label = _array(label)
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape[:2]} differ in size")
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(label, palette, ignore_index)
    out = np.rint(blended).clip(0, 255).astype(np.uint8)
    void = label == ignore_index
    out[void] = image[void]
    return out


def confusion_matrix_figure(confusion: Any, class_names: Sequence[str], title: str = "") -> Figure:
    """The (K, K) confusion matrix (rows ground truth, columns prediction) normalised per row, so each row
    shows where that class's pixels went (a class absent from the ground truth gets a row of zeros).
    Cells are annotated with the fraction up to 20 classes. Axes: the matrix, then its colour bar."""
    counts = _array(confusion).astype(np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(class_names):
        raise ValueError(f"confusion {counts.shape} does not match {len(class_names)} class names")
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    size = len(class_names)
    inches = min(max(4.0, 0.45 * size + 2.0), 20.0)
    figure = Figure(figsize=(inches + 1.0, inches), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    shown = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=axes, fraction=0.046, label="fraction of the row's pixels")
    axes.set_xticks(range(size), labels=class_names, rotation=90)
    axes.set_yticks(range(size), labels=class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("ground truth")
    if title:
        axes.set_title(title)
    if size <= _ANNOTATE_UP_TO:
        for row in range(size):
            for col in range(size):
                colour = "white" if rates[row, col] > 0.5 else "black"  # readable on dark and light cells
                axes.text(
                    col, row, f"{rates[row, col]:.2f}", ha="center", va="center", color=colour, fontsize=7
                )
    return figure


def overlay_figure(
    images: Sequence[Any],
    predictions: Sequence[Any],
    labels: Sequence[Any] | None,
    palette: Sequence[Sequence[int]],
    ignore_index: int = 255,
    class_names: Sequence[str] = (),
    title: str = "",
) -> Figure:
    """One row per sample: the image, its prediction overlaid, and (when ``labels`` is given) its ground
    truth overlaid. Void ground-truth pixels show the bare image. With ``class_names``, a legend of the
    class colours goes below the panels; ``title`` (e.g. the run and protocol) above them."""
    if len(predictions) != len(images) or (labels is not None and len(labels) != len(images)):
        raise ValueError("images, predictions and labels must hold the same number of samples")
    if not images:
        raise ValueError("no samples to plot")
    titles = ["image", "prediction"] + (["ground truth"] if labels is not None else [])
    figure, axes = _figure(len(images), len(titles))
    for row, image in enumerate(images):
        panels = [_array(image), overlay(image, predictions[row], palette, ignore_index=ignore_index)]
        if labels is not None:
            panels.append(overlay(image, labels[row], palette, ignore_index=ignore_index))
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(titles[col])
    if class_names:
        handles = [
            Patch(facecolor=(colour[0] / 255, colour[1] / 255, colour[2] / 255), label=name)
            for name, colour in zip(class_names, palette, strict=False)
        ]
        figure.legend(
            handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8, frameon=False
        )
    if title:
        figure.suptitle(title)
    return figure


def attention_maps_figure(
    image: Any, maps: Any, pixels: Sequence[tuple[int, int]], title: str = ""
) -> Figure:
    """Where chosen pixels look after each recurrence, as in the CCNet paper's attention figure.

    Args:
        image: (H, W, 3) uint8.
        maps: (R, P, h, w) attention at feature resolution, entry ``r - 1`` after ``r`` steps (e.g.
            ``ccnet_attention_maps(...)[:, b]``).
        pixels: the P ``(row, col)`` pixels in image coordinates.

    Returns:
        P rows of 1 + R axes: the image with the pixel marked, then the map after R=1, R=2, ... stretched
        bilinearly over the image, each scaled to its own maximum.
    """
    image = _array(image)
    maps = _array(maps).astype(np.float32)
    if maps.ndim != 4 or maps.shape[1] != len(pixels):
        raise ValueError(f"maps must be (R, P={len(pixels)}, h, w), got {maps.shape}")
    height, width = image.shape[:2]
    steps = maps.shape[0]
    figure, axes = _figure(len(pixels), 1 + steps)
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the image's own pixel grid
    for row, (y, x) in enumerate(pixels):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(f"pixel ({y}, {x})")
        for step in range(steps):
            panel = axes[row, 1 + step]
            attention = maps[step, row]
            peak = float(attention.max())
            panel.imshow(image)
            panel.imshow(
                attention / peak if peak > 0 else attention,
                cmap="jet",
                alpha=0.55,
                vmin=0.0,
                vmax=1.0,
                extent=extent,
                interpolation="bilinear",
            )
            panel.set_title(f"R={step + 1}")
        for panel in axes[row]:
            panel.plot([x], [y], marker="x", color="white", markersize=9, markeredgewidth=2.5)
            panel.set_axis_off()
    if title:
        figure.suptitle(title)
    return figure


_DIAGNOSTICS_PANELS = {  # figure -> (panel title, the y-axis's bounds: None where the data decide)
    "gamma": ("gamma", (None, None)),
    "share": ("share ||γ·A(x)|| / ||x||", (0.0, None)),
    "entropy_normalised": ("entropy / log(keys): 1 uniform", (0.0, 1.05)),
    "distance": ("mean distance (feature pixels)", (0.0, None)),
}


def attention_diagnostics_figure(
    history: Sequence[tuple[int, Mapping[str, float]]], threshold: float, title: str = ""
) -> Figure:
    """The attention diagnostics over a run: gamma, share, normalised entropy and distance against the
    iteration, one line per place of the model (``head``, ``stem``).

    Args:
        history: ``(iteration, metrics)`` in run order, metrics named ``attention/<place>/<figure>``
            (:func:`ccnet.diagnostics.attention_diagnostics`); other names are ignored.
        threshold: the share at which the attention counts as engaged, a dashed line on the share's axes.
        title: drawn above the figure (the run's name).

    Returns:
        Four axes in a row, in the order above.
    """
    places = sorted(
        {name.split("/")[1] for _, metrics in history for name in metrics if name.startswith("attention/")}
    )
    if not places:
        raise ValueError("no attention diagnostics to plot")
    figure, axes = _figure(1, len(_DIAGNOSTICS_PANELS), panel_inches=3.5)
    axes[0, 1].axhline(
        threshold, color="black", linestyle="--", linewidth=0.8, label=f"engaged ({threshold:g})"
    )
    for panel, (name, (label, bounds)) in zip(axes[0], _DIAGNOSTICS_PANELS.items(), strict=True):
        for place in places:
            key = f"attention/{place}/{name}"
            points = [(iteration, metrics[key]) for iteration, metrics in history if key in metrics]
            panel.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=place)
        panel.set_title(label)
        panel.set_xlabel("iteration")
        panel.set_ylim(*bounds)
        panel.ticklabel_format(axis="y", useOffset=False)  # a flat curve reads as its value, not an offset
        panel.grid(alpha=0.3)
    axes[0, 1].legend(loc="best")
    if title:
        figure.suptitle(title)
    return figure


def ablation_figure(
    variants: Sequence[str],
    miou: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    attention_gflops: Sequence[float],
    title: str = "",
    differences: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    baseline: str | None = None,
) -> Figure:
    """An ablation at a glance: mIoU per variant with its 95 % interval over seeds, the paired differences to
    a baseline with theirs, and the attention's cost.

    Args:
        variants: the V variant names, in table order.
        miou: protocol name -> (V means, V half-widths of the 95 % intervals), as fractions in [0, 1]; NaN
            for a variant with no result, a half-width NaN where there is no interval (one seed).
        attention_gflops: GFLOPs of each variant's attention modules alone.
        title: drawn above the figure (the search's name).
        differences: protocol name -> (V mean paired differences to ``baseline``, V half-widths), as
            fractions, NaN like ``miou``'s; the baseline's own entries are not drawn.
        baseline: the variant ``differences`` are to; needed with them.

    Returns:
        Two axes: grouped bars of mIoU (%) with error bars of the 95 % interval, then bars of attention
        GFLOPs; with ``differences``, between the two the differences (percentage points) as markers with
        error bars of their intervals, one position per variant but the baseline, and a line at 0.
    """
    if differences is not None and baseline is None:
        raise ValueError("differences need the baseline they are to")
    count = len(variants)
    panels = 2 if differences is None else 3
    figure, axes = _figure(1, panels, panel_inches=max(4.0, 0.55 * count + 1.5))
    positions = np.arange(count)
    width = 0.8 / max(len(miou), 1)
    for index, (protocol, (means, half_widths)) in enumerate(miou.items()):
        offset = (index - (len(miou) - 1) / 2) * width
        axes[0, 0].bar(
            positions + offset,
            100 * np.asarray(means, dtype=float),
            width,
            yerr=100 * np.asarray(half_widths, dtype=float),
            capsize=3,
            label=protocol,
        )
    axes[0, 0].set_ylabel("val mIoU (%), mean and 95 % CI over seeds")
    axes[0, 0].legend(loc="lower right")
    axes[0, 0].set_xticks(positions, labels=list(variants), rotation=45, ha="right")
    if differences is not None:
        _differences_panel(axes[0, 1], variants, differences, str(baseline), width)
    axes[0, -1].bar(positions, np.asarray(attention_gflops, dtype=float), 0.6, color="tab:gray")
    axes[0, -1].set_ylabel("attention GFLOPs (one image)")
    axes[0, -1].set_xticks(positions, labels=list(variants), rotation=45, ha="right")
    for panel in axes[0]:
        panel.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title)
    return figure


def _differences_panel(
    axes: Any,
    variants: Sequence[str],
    differences: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    baseline: str,
    width: float,
) -> None:
    """Each variant's paired differences to ``baseline`` in percentage points, a marker per protocol with
    error bars of its 95 % interval; a line at 0, where an interval that crosses it resolves nothing."""
    compared = [index for index, name in enumerate(variants) if name != baseline]
    positions = np.arange(len(compared))
    for index, (protocol, (means, half_widths)) in enumerate(differences.items()):
        offset = (index - (len(differences) - 1) / 2) * width
        axes.errorbar(
            positions + offset,
            100 * np.asarray(means, dtype=float)[compared],
            yerr=100 * np.asarray(half_widths, dtype=float)[compared],
            fmt="o",
            capsize=3,
            label=protocol,
        )
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_ylabel(f"Δ val mIoU vs {baseline} (pp), paired, 95 % CI")
    axes.legend(loc="best")
    axes.set_xticks(positions, labels=[variants[index] for index in compared], rotation=45, ha="right")
