"""ONNX export of a segmentation model, and an onnxruntime model that predicts like the PyTorch one.

Every registered model (criss-cross, rows-then-columns and non-local attention in the head, the stem or both,
R = 0-3) exports with its batch, height and width dynamic, through ``torch.onnx.export(dynamo=True)``: the
legacy TorchScript exporter also exports these models without an error, but its graph's logits differ from
PyTorch's by up to 0.14 (a few percent of the argmax pixels), so it is not used::

    export_onnx(model, "ccnet.onnx", metadata={"ccnet.classes": "road,car"})
    onnx_model = OnnxSegmenter("ccnet.onnx")          # an nn.Module with no parameters
    logits = onnx_model(image)["out"]                 # as model(image)["out"]: ccnet.inference takes either

The graph maps a normalised image batch ``image`` (B, 3, H, W) float32 to ``logits`` (B, K, H, W), as the
PyTorch model's main output does; the normalisation's mean and std and whatever else the caller passes are
stored in the file's metadata (``OnnxSegmenter.metadata``). onnx, onnxscript and onnxruntime come with the
``onnx`` extra (``pip install ccnet[onnx]``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ccnet.inference import LogitsOnly

OPSET = 18
MIN_SIDE = 33  # the exporter's lower bound of a dynamic side (0 and 1 are specialised); ORT runs any size
MAX_SIDE = 8192


_EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """The named loggers at WARNING (or above, as they were) while the block runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _logits_only(model: nn.Module) -> nn.Module:
    """``model`` as a module returning one tensor: a CCNet (whose forward returns a dict) wrapped."""
    return model if isinstance(model, LogitsOnly) else LogitsOnly(model)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    opset: int = OPSET,
    example_size: tuple[int, int] = (64, 64),
) -> Path:
    """Writes ``model`` (in eval mode; its mode is restored) as an ONNX file at ``path``, whole or not at all.

    Args:
        model: a segmentation model (``model(image)["out"]``) or a :class:`ccnet.inference.LogitsOnly`.
        metadata: string pairs stored in the file's ``metadata_props`` (read back by :class:`OnnxSegmenter`).
        opset: the ONNX opset.
        example_size: height and width of the example traced (any size in [33, 8192] works afterwards).

    Raises:
        ImportError: onnx or onnxscript is not installed (names the extra that brings them).
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency: fail here, with the fix named)
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript: pip install 'ccnet[onnx]' ({error})"
        ) from None
    path = Path(path)
    wrapped = _logits_only(model)
    was_training = model.training  # the caller's model: a new wrapper starts in training mode
    wrapped.eval()
    image = torch.zeros(1, 3, *example_size)
    side = {"min": MIN_SIDE, "max": MAX_SIDE}
    dims = {
        0: torch.export.Dim("batch", min=1, max=1024),
        2: torch.export.Dim("height", **side),
        3: torch.export.Dim("width", **side),
    }
    try:
        # The exporter prints its progress to stdout, logs each graph pass and warns about its own internals:
        # kept off the console.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet(_EXPORTER_LOGGERS):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped,
                (image,),
                dynamo=True,
                opset_version=opset,
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes={"image": dims},
                verbose=False,
            )
    finally:
        model.train(was_training)
    assert program is not None, "torch.onnx.export(dynamo=True) returns the exported program"
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        onnx.save_model(proto, str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


class OnnxSegmenter(nn.Module):
    """An exported model run by onnxruntime on the CPU, called like the PyTorch model it came from:
    ``segmenter(image)["out"]`` is the (B, K, H, W) float32 logits of a normalised (B, 3, H, W) batch.

    Attributes:
        metadata: the file's metadata (``export_onnx(metadata=...)``).
        num_classes: K, read from the graph's output when it is static, else from ``ccnet.num_classes``.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                f"the onnx backend needs onnxruntime: pip install 'ccnet[onnx]' ({error})"
            ) from None
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise
        self.path = str(path)
        try:
            self.session = onnxruntime.InferenceSession(
                self.path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime's own exception types (InvalidProtobuf, NoSuchFile, Fail)
            message = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ValueError(f"{self.path}: onnxruntime cannot load it ({message})") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        (output,) = self.session.get_outputs()
        classes = output.shape[1]
        if not isinstance(classes, int):
            classes = int(self.metadata.get("ccnet.num_classes", 0))
        self.num_classes: int = classes

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(["logits"], {"image": array})
        return {"out": torch.from_numpy(logits).to(image.device)}

    def json_metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value stored as JSON (e.g. ``ccnet.normalization``), or ``default``."""
        value = self.metadata.get(key)
        return default if value is None else json.loads(value)


__all__ = ["OnnxSegmenter", "export_onnx"]
