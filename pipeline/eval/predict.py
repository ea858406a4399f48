"""Predict image files and write coloured masks and overlays next to each other.

For every input ``<stem>.<ext>`` two PNGs go to ``out_dir``: ``<stem>_mask.png`` (each pixel in its
predicted class's palette colour) and ``<stem>_overlay.png`` (the image blended half-and-half with the
mask)::

    model = build_ccnet("ccnet_tiny", num_classes=len(source.classes))
    written = predict_images(model, sorted(Path("photos").glob("*.jpg")), palette=source.palette,
                             out_dir=Path("runs/predictions"),
                             protocol=EvalProtocol(mode="slide", crop_size=769, stride=513))

Files are written under a temporary name and renamed into place, so a reader never sees half a PNG; no
output replaces an input or a file ccnet did not write (:mod:`pipeline.io.outputs`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ccnet.backbones import Normalization
from ccnet.inference import predict_multiscale
from pipeline.data.images import read_rgb
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.eval.evaluation import EvalProtocol
from pipeline.eval.plots import colorize
from pipeline.io import storage
from pipeline.io.outputs import check_targets, png_bytes

log = logging.getLogger(__name__)

IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD)
WHOLE_IMAGE = EvalProtocol()  # the whole image at scale 1.0, no flip


def _blend(image: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * mask``, rounded, both (H, W, 3) uint8."""
    mixed = (1.0 - alpha) * image.astype(np.float64) + alpha * mask.astype(np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _write_png(array: np.ndarray, path: Path) -> None:
    """Written whole or not at all (:func:`pipeline.io.storage.write_bytes`), marked as ccnet's."""
    storage.write_bytes(str(path), png_bytes(array, "predict"))


def predict_images(
    model: nn.Module,
    paths: Sequence[Path],
    *,
    palette: Sequence[Sequence[int]],
    out_dir: Path,
    normalization: Normalization = IMAGENET,
    protocol: EvalProtocol = WHOLE_IMAGE,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
    ignore_index: int = 255,
    alpha: float = 0.5,
    progress: bool = True,
) -> list[Path]:
    """Predict each image file and write its coloured mask and overlay.

    The model runs in eval mode (its previous mode is restored afterwards); images are read as 8-bit RGB the
    way training reads them (:mod:`pipeline.data.images`: 16-bit, gray, RGBA and palette files too), scaled
    to [0, 1] and normalised as in training, then predicted with
    :func:`ccnet.inference.predict_multiscale`.

    Args:
        model: segmentation model (``model(image)["out"]`` is (B, K, h, w) logits), already on ``device``.
        paths: image files (anything PIL reads); their stems must differ, as they name the outputs.
        palette: RGB colour of each class id.
        out_dir: output folder, created if missing; outputs of the same name that ccnet wrote are replaced,
            and any other file (an input above all) is never: see :mod:`pipeline.io.outputs`.
        normalization: per-channel mean and std of the [0, 1] image (the model's training's).
        protocol: how each image is predicted (whole or sliding window, scales, flip, fusion), as for
            :func:`pipeline.eval.evaluation.evaluate`; its ``max_images`` does not apply.
        num_classes: K, for sliding windows; default ``len(palette)``.
        device: where images are predicted.
        ignore_index: id painted black by :func:`colorize` (predictions never take it).
        alpha: weight of the mask in the overlay.
        progress: show a progress bar.

    Returns:
        The written files, ``[<stem>_mask.png, <stem>_overlay.png]`` per image, in input order.

    Raises:
        ValueError: two inputs share a stem, an output would replace an input or a file ccnet did not write
            (nothing is written), or an image cannot be read (the message names the file; the images before
            it keep their outputs, nothing is written for it or after it).
    """
    paths = [Path(path) for path in paths]
    stems = [path.stem for path in paths]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        raise ValueError(f"inputs share file stems {duplicates}: their outputs would overwrite each other")
    num_classes = len(palette) if num_classes is None else num_classes
    device = torch.device(device)
    out_dir = Path(out_dir)
    targets = [str(out_dir / f"{path.stem}_{suffix}.png") for path in paths for suffix in ("mask", "overlay")]
    check_targets(targets, [str(path) for path in paths], "--out")  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    mean_t = torch.tensor(normalization.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(normalization.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    written: list[Path] = []
    was_training = model.training
    model.eval()
    try:
        for path in tqdm(paths, unit="img", desc="predict", disable=not progress):
            rgb = read_rgb(path)  # (H, W, 3) uint8
            image = torch.from_numpy(rgb).to(device).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
            image = (image.float() / 255 - mean_t) / std_t
            probs = predict_multiscale(
                model,
                image,
                scales=protocol.scales,
                flip=protocol.flip,
                mode=protocol.mode,
                crop_size=protocol.crop_size,
                stride=protocol.stride,
                num_classes=num_classes,
                fusion=protocol.fusion,
            )  # (1, K, H, W)
            ids = probs.argmax(dim=1)[0].cpu().numpy()  # (H, W)
            mask = colorize(ids, palette, ignore_index)
            for suffix, array in (("mask", mask), ("overlay", _blend(rgb, mask, alpha))):
                target = out_dir / f"{path.stem}_{suffix}.png"
                _write_png(array, target)
                written.append(target)
    finally:
        model.train(was_training)
    log.info("wrote masks and overlays of %d images to %s", len(paths), out_dir)
    return written


__all__ = ["colorize", "predict_images"]
