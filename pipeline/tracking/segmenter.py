"""The registered model's MLflow pyfunc: images in, class maps out, by onnxruntime (no PyTorch, no pickle).

MLflow loads this file as the model's code ("models from code"): it needs numpy, Pillow and onnxruntime
only. The model's artifacts are the exported graph (``onnx_model``, :mod:`ccnet.export`, whose metadata holds
the input normalisation) and the training checkpoint (``checkpoint``, for ``ccnet predict|evaluate``)::

    model = mlflow.pyfunc.load_model("models:/ccnet-camvid@champion")
    class_map = model.predict(np.asarray(Image.open("frame.png").convert("RGB")))[0]   # (H, W) class ids

    mlflow models serve -m models:/ccnet-camvid@champion --env-manager local --host 127.0.0.1 --port 5001
    curl -X POST 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["image"], "data": [["<the PNG or JPEG file, base64>"]]}}'

Inputs: a table with an ``image`` column of encoded image files (bytes, or base64 text as JSON carries
them), or pixel arrays: one (H, W, 3) uint8 RGB image or a batch (N, H, W, 3). The answer is one class map
per image (a list of rows of class ids), at the image's own size. An input that is not an image, not RGB, or
larger than :data:`MAX_PIXELS` is refused with a 400 naming what is wrong; the server goes on serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 4096 * 4096  # per image: 16 Mpx (a 4K frame is 8.3 Mpx)
MIN_SIDE = 8


def _refuse(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # HTTP 400


def _decode(value: Any, index: int) -> np.ndarray:
    """An encoded image file (bytes or base64 text) as (H, W, 3) uint8 RGB."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _refuse(f"image {index}: text that is not base64 (send the file as base64)") from None
    if not isinstance(value, bytes | bytearray):
        raise _refuse(
            f"image {index}: expected an encoded image file (bytes or base64), got {type(value).__name__}"
        )
    try:
        with Image.open(io.BytesIO(value)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise _refuse(f"image {index}: {image.width}x{image.height} is over {MAX_PIXELS} pixels")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise _refuse(f"image {index}: not an image file PIL can read ({type(error).__name__})") from None


def _images(model_input: Any) -> list[np.ndarray]:
    """The request's images as (H, W, 3) uint8 arrays."""
    import pandas as pd

    if isinstance(model_input, dict) and "image" in model_input:
        model_input = pd.DataFrame({"image": np.atleast_1d(model_input["image"])})
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise _refuse(f"expected a column 'image' of image files, got columns {list(model_input)}")
        return [_decode(value, i) for i, value in enumerate(model_input["image"])]
    try:
        array = np.asarray(model_input)
    except (ValueError, TypeError):
        raise _refuse("expected an 'image' column of files, or (H, W, 3) / (N, H, W, 3) arrays") from None
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype.kind not in "iuf":
        raise _refuse(
            f"expected RGB pixel arrays of shape (H, W, 3) or (N, H, W, 3), got shape "
            f"{array.shape} of {array.dtype}"
        )
    if array.shape[1] * array.shape[2] > MAX_PIXELS:
        raise _refuse(f"images of {array.shape[2]}x{array.shape[1]} are over {MAX_PIXELS} pixels")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise _refuse("pixel values must lie in 0..255")
    return [np.asarray(image, dtype=np.uint8) for image in array]


class Segmenter(PythonModel):
    """Normalises each image as in training, runs the exported graph, returns the argmax class map."""

    def load_context(self, context: Any) -> None:
        import onnxruntime

        path = context.artifacts["onnx_model"]
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        normalization = json.loads(metadata["ccnet.normalization"])
        self.mean = np.asarray(normalization["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(normalization["std"], dtype=np.float32).reshape(1, 3, 1, 1)

    def segment(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) int64 class ids."""
        height, width = image.shape[:2]
        if min(height, width) < MIN_SIDE:
            raise _refuse(f"image of {width}x{height}: each side must be at least {MIN_SIDE} pixels")
        batch = image.astype(np.float32).transpose(2, 0, 1)[None] / 255.0
        (logits,) = self.session.run(["logits"], {"image": (batch - self.mean) / self.std})
        return logits[0].argmax(axis=0)

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list:
        return [self.segment(image).tolist() for image in _images(model_input)]


set_model(Segmenter())
