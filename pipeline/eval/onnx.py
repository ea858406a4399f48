"""A trained checkpoint as an ONNX file that carries what a prediction needs, checked against PyTorch.

    model, normalization = model_of_checkpoint(config, state)
    report = export_checkpoint(model, "ccnet.onnx", metadata=onnx_metadata(config, state, normalization))
    segmenter, protocol = open_onnx("ccnet.onnx")   # for ccnet predict --backend onnx

The file's metadata (:class:`ccnet.export.OnnxSegmenter`'s ``metadata``) holds the input normalisation, the
classes and their palette when the dataset's manifest was reachable, the variant and the evaluation protocol
(mode, crop, stride, scales, flip, fusion), so ``ccnet predict --backend onnx model.onnx`` needs neither the
checkpoint nor the dataset. Every export is checked: onnxruntime and PyTorch predict two images (one whose
sides are not multiples of the output stride) and the largest logit difference and the share of argmax
pixels that agree are returned (:class:`Parity`); an export outside fp32 tolerance is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ccnet.backbone_base import Normalization
from ccnet.export import OnnxSegmenter, export_onnx
from pipeline.config import Config
from pipeline.eval.evaluation import EvalProtocol

log = logging.getLogger(__name__)

PARITY_SIZES = ((64, 96), (77, 101))  # the second: sides that are not multiples of the output stride
MAX_LOGIT_DIFFERENCE = 1e-3  # fp32: exports measured here differ by < 1e-5 on logits of a few units
MIN_AGREEMENT = 0.999


@dataclass(frozen=True)
class Parity:
    """onnxruntime against PyTorch on the same inputs."""

    max_logit_difference: float
    argmax_agreement: float  # share of pixels whose class is the same

    def __str__(self) -> str:
        return (
            f"onnxruntime vs PyTorch: max |logit difference| {self.max_logit_difference:.1e}, "
            f"argmax agreement {100 * self.argmax_agreement:.3f} %"
        )


def eval_protocol(config: Config) -> dict[str, Any]:
    """How a prediction is made (``config.eval``): what an exported file keeps and ``ccnet predict`` uses."""
    protocol = dataclasses.asdict(EvalProtocol.multi_scale(config.eval))
    del protocol["max_images"]  # an evaluation's subset, not how an image is predicted
    return protocol | {"scales": list(protocol["scales"])}


def onnx_metadata(
    config: Config,
    normalization: Normalization,
    num_classes: int,
    *,
    classes: list[str] | None = None,
    palette: Any = None,
    variant: str | None = None,
) -> dict[str, str]:
    """The metadata stored in the file: strings, JSON where structured."""
    metadata = {
        "ccnet.num_classes": str(num_classes),
        "ccnet.model": config.model.name,
        "ccnet.normalization": json.dumps(normalization.as_dict()),
        "ccnet.eval": json.dumps(eval_protocol(config)),
    }
    if classes:
        metadata["ccnet.classes"] = json.dumps(list(classes))
    if palette:
        metadata["ccnet.palette"] = json.dumps([list(colour) for colour in palette])
    if variant:
        metadata["ccnet.variant"] = variant
    return metadata


def parity(
    model: nn.Module,
    segmenter: OnnxSegmenter,
    sizes: tuple[tuple[int, int], ...] = PARITY_SIZES,
    images: list[torch.Tensor] | None = None,
    seed: int = 0,
) -> Parity:
    """``model`` (eval mode) and ``segmenter`` on ``images`` (normalised (1, 3, H, W)), by default random
    ones of ``sizes``."""
    if images is None:
        generator = torch.Generator().manual_seed(seed)
        images = [torch.randn(1, 3, *size, generator=generator) for size in sizes]
    worst, agree, pixels = 0.0, 0, 0
    with torch.inference_mode():
        for image in images:
            reference = model(image)["out"].float()
            exported = segmenter(image)["out"]
            worst = max(worst, float((exported - reference).abs().max()))
            agree += int((exported.argmax(1) == reference.argmax(1)).sum())
            pixels += reference[:, 0].numel()
    return Parity(worst, agree / pixels)


def export_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, str]) -> Parity:
    """Exports ``model`` to ``path`` with ``metadata`` and checks it (:func:`parity`).

    Raises:
        RuntimeError: the exported graph predicts outside fp32 tolerance (the file is removed).
    """
    model.eval()
    export_onnx(model, path, metadata=metadata)
    report = parity(model, OnnxSegmenter(path))
    if report.max_logit_difference > MAX_LOGIT_DIFFERENCE or report.argmax_agreement < MIN_AGREEMENT:
        Path(path).unlink(missing_ok=True)
        raise RuntimeError(
            f"the ONNX export of {metadata.get('ccnet.model')} does not predict like PyTorch "
            f"({report}); nothing written"
        )
    return report


@dataclass(frozen=True)
class OnnxModel:
    """An exported model opened for prediction, with what its metadata says."""

    segmenter: OnnxSegmenter
    normalization: Normalization
    num_classes: int
    protocol: dict[str, Any]
    palette: tuple[tuple[int, int, int], ...] | None


def open_onnx(path: str | Path) -> OnnxModel:
    """An ONNX file this project exported, opened with onnxruntime.

    Raises:
        ValueError: the file lacks the project's metadata (it names the file).
    """
    segmenter = OnnxSegmenter(path)
    try:
        normalization = Normalization.from_dict(segmenter.json_metadata("ccnet.normalization"))
        protocol = segmenter.json_metadata("ccnet.eval")
        palette = segmenter.json_metadata("ccnet.palette")
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: not an ONNX model `ccnet export` wrote (metadata: {error})") from None
    if not segmenter.num_classes or not isinstance(protocol, dict):
        raise ValueError(f"{path}: not an ONNX model `ccnet export` wrote (no classes or protocol)")
    colours = tuple((int(r), int(g), int(b)) for r, g, b in palette) if palette else None
    return OnnxModel(segmenter, normalization, segmenter.num_classes, protocol, colours)


__all__ = [
    "OnnxModel",
    "Parity",
    "eval_protocol",
    "export_checkpoint",
    "onnx_metadata",
    "open_onnx",
    "parity",
]
