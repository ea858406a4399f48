"""Dataset source adapters by name: ``build_source("camvid", "/data/CamVid")``.

Each adapter lists a dataset's samples in its real on-disk layout and loads them with labels mapped to
train ids (see :mod:`pipeline.data.sources.base`); ``generated`` makes its samples instead of reading them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data.sources.ade20k import ADE20KSource
from pipeline.data.sources.base import (
    IGNORE_INDEX,
    BadSampleError,
    DatasetSource,
    LoadedSample,
    SampleRef,
)
from pipeline.data.sources.camvid import CamVidSource
from pipeline.data.sources.cityscapes import CityscapesSource
from pipeline.data.sources.cocostuff import COCOStuffSource
from pipeline.data.sources.generated import GeneratedSource

SOURCES: dict[str, type[DatasetSource]] = {
    "cityscapes": CityscapesSource,
    "ade20k": ADE20KSource,
    "cocostuff": COCOStuffSource,
    "camvid": CamVidSource,
    "generated": GeneratedSource,
}

__all__ = [
    "IGNORE_INDEX",
    "SOURCES",
    "ADE20KSource",
    "BadSampleError",
    "COCOStuffSource",
    "CamVidSource",
    "CityscapesSource",
    "DatasetSource",
    "GeneratedSource",
    "LoadedSample",
    "SampleRef",
    "build_source",
]


def build_source(name: str, root: str | Path | None, **options: Any) -> DatasetSource:
    """The adapter ``name`` for the dataset under ``root``, with adapter-specific keyword ``options``.

    Raises:
        ValueError: ``name`` is not a key of ``SOURCES`` (the message lists them).
        FileNotFoundError: ``root`` is not a folder (every adapter but ``generated`` needs one).
        TypeError: an option the adapter does not take.
    """
    try:
        source_class = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown dataset source {name!r}; known: {sorted(SOURCES)}") from None
    if root is None:
        if source_class is not GeneratedSource:
            raise FileNotFoundError(f"dataset source {name!r} needs a root folder")
        return GeneratedSource(root, **options)
    return source_class(root, **options)
