"""argparse types shared by the command modules (numbers, storage locations, checkpoints, output folders): a
bad flag value is one usage line, exit status 2."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from pipeline.io.paths import Location, LocationError, parse_location


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """argparse type of a finite number (``kind``) >= ``minimum``: "--workers 0" is one usage line."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def parse_location_argument(text: str) -> Location:
    """An argument's location, or the argparse error (exit 2, one line) that says why it is not one."""
    try:
        return parse_location(text)
    except LocationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def location(text: str) -> str:
    """argparse type of a storage location (``s3://bucket/prefix``, a local path, ``file:///abs``)."""
    parse_location_argument(text)
    return text


def checkpoint(text: str) -> str:
    """argparse type of a checkpoint: a storage location, or a registered model (``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``) whose stored checkpoint is used."""
    if text.startswith("models:/"):
        if not re.fullmatch(r"models:/[^/@]+(@[\w-]+|/\d+)", text):
            raise argparse.ArgumentTypeError(f"{text!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return text
    return location(text)


def local_folder(text: str) -> str:
    """argparse type of an output folder on this machine: a local path (``file:///abs`` accepted)."""
    parsed = parse_location_argument(text)
    if parsed.is_s3:
        raise argparse.ArgumentTypeError(f"{text!r} is on S3: this command writes to a local folder")
    return parsed.path
