"""The rule for files a command writes beside the user's: it never replaces a file it reads, nor one it did
not create.

Every PNG a command writes carries a mark (the PNG text chunk ``Software: ccnet <command>``); a later run may
replace a file with that mark (predicting the same folder again), nothing else. :func:`check_targets` runs
before any work, so a refused command has written nothing.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from pipeline.io import storage
from pipeline.io.paths import inside, normal_location
from pipeline.io.redaction import redact

MARK_KEY = "Software"


class OutputError(ValueError):
    """An output would replace an input, or a file the command did not create."""


def png_bytes(array: np.ndarray, command: str) -> bytes:
    """``array`` (H, W[, 3]) uint8 as a PNG marked as written by ``ccnet <command>``."""
    info = PngImagePlugin.PngInfo()
    info.add_text(MARK_KEY, f"ccnet {command}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def written_by_ccnet(data: bytes) -> bool:
    """Whether ``data`` is a PNG that a ccnet command wrote (see :func:`png_bytes`)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format == "PNG" and str(image.info.get(MARK_KEY, "")).startswith("ccnet ")
    except Exception:  # anything PIL cannot open is not ours
        return False


def check_targets(
    targets: Sequence[str], inputs: Sequence[str], flag: str, input_folders: Sequence[str] = ()
) -> None:
    """Refuses (OutputError naming ``flag`` and the file) a target that is one of ``inputs`` (paths or
    URIs; links resolved) or lies in one of ``input_folders``, is a folder, or exists and was not written
    by a ccnet command."""
    for target in targets:
        shown = redact(target)
        if any(normal_location(target) == normal_location(source) for source in inputs):
            raise OutputError(
                f"{flag}: {shown} is also an input; it would be replaced by an output. "
                "Choose another output folder"
            )
        if any(inside(target, folder) for folder in input_folders):
            raise OutputError(
                f"{flag}: {shown} lies inside an input ({redact(input_folders[0])}), which "
                "the command only reads. Choose another output"
            )
        if not storage.is_s3(target) and os.path.isdir(target):
            raise OutputError(f"{flag}: {shown} is a folder; it would be replaced by a file")
        if storage.exists(target) and not written_by_ccnet(storage.read_bytes(target)):
            raise OutputError(
                f"{flag}: {shown} exists and was not written by ccnet; it would be replaced. "
                "Choose another output, or move that file"
            )
