"""Training checkpoints: one file per checkpoint, in the run's storage (local folder or S3).

A checkpoint holds the model, optimizer and scaler states, the iteration, the best validation mIoU so far,
the RNG states, the tracked run's id and the input normalisation the model was trained with, all loadable
with ``torch.load(weights_only=True)``. Files are written whole under their final name (storage writes are
atomic), so a reader never sees a partial checkpoint.

Layout without Ray: ``<storage>/<run name>/checkpoints/iter_NNNNNNN/checkpoint.pt`` (the last K kept) and
``<storage>/<run name>/best/checkpoint.pt``. With Ray, Ray Train stores the periodic ones in its own layout
under the same run folder and this module only serialises them.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from ccnet.backbones import Normalization
from pipeline.io import storage

CHECKPOINT_FILE = "checkpoint.pt"
_ITERATION = re.compile(r"^iter_(\d{7})/" + re.escape(CHECKPOINT_FILE) + "$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unreadable, not a checkpoint, or for another model."""


def to_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes, source: str) -> dict[str, Any]:
    """Deserialise with ``weights_only=True`` (no code runs from a checkpoint file)."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise CheckpointError(f"{source}: not a loadable checkpoint ({type(error).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise CheckpointError(f"{source}: not a CCNet training checkpoint (no model/iteration)")
    return state


def load(uri: str) -> dict[str, Any]:
    """Read a checkpoint file (local path or ``s3://``); a folder means its ``checkpoint.pt``."""
    if not uri.endswith(".pt"):
        uri = storage.join(uri, CHECKPOINT_FILE)
    return from_bytes(storage.read_bytes(uri), storage.redact(uri))


def save_file(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as ``<directory>/checkpoint.pt`` (a local folder, e.g. for Ray's Checkpoint)."""
    path = Path(directory) / CHECKPOINT_FILE
    storage.write_bytes(str(path), to_bytes(state))
    return path


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """Load a checkpoint's weights; a checkpoint of another model is a one-line CheckpointError."""
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state["model"], strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as error:  # shape mismatches
        first = str(error).strip().splitlines()[1:2] or [str(error)]
        raise CheckpointError(f"{source}: checkpoint does not fit this model: {first[0].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: checkpoint does not fit this model: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )


def tracking_run_id(state: dict[str, Any]) -> str | None:
    """The tracked run a checkpoint was written by (``mlflow_run_id`` in checkpoints from before the key
    named no tracker)."""
    return state.get("tracking_run_id") or state.get("mlflow_run_id")


def checkpoint_normalization(state: dict[str, Any], model: torch.nn.Module) -> Normalization:
    """The input normalisation a checkpoint was trained with (saved since EfficientNet-Lite); older
    checkpoints, which lack it, get the model's own (all their backbones used ImageNet statistics)."""
    saved = state.get("normalization")
    if saved:
        return Normalization.from_dict(saved)
    normalization = model.normalization
    assert isinstance(normalization, Normalization), "a model of this project carries its normalisation"
    return normalization


class CheckpointStore:
    """Periodic and best checkpoints of one run, for runs without Ray."""

    def __init__(self, run_uri: str) -> None:
        self.run_uri = run_uri
        self.root = storage.join(run_uri, "checkpoints")

    def save(self, state: dict[str, Any], iteration: int) -> str:
        uri = storage.join(self.root, f"iter_{iteration:07d}", CHECKPOINT_FILE)
        storage.write_bytes(uri, to_bytes(state))
        return uri

    def iterations(self) -> list[int]:
        names = storage.list_files(self.root)
        return sorted(int(match.group(1)) for name in names if (match := _ITERATION.match(name)))

    def latest(self) -> str | None:
        iterations = self.iterations()
        return storage.join(self.root, f"iter_{iterations[-1]:07d}", CHECKPOINT_FILE) if iterations else None

    def prune(self, keep: int) -> None:
        for iteration in self.iterations()[:-keep]:
            storage.delete(storage.join(self.root, f"iter_{iteration:07d}", CHECKPOINT_FILE))

    def best_uri(self) -> str:
        return storage.join(self.run_uri, "best", CHECKPOINT_FILE)

    def save_best(self, state: dict[str, Any]) -> str:
        storage.write_bytes(self.best_uri(), to_bytes(state))
        return self.best_uri()
