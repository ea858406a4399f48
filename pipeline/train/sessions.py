"""Where the training loop runs: a :class:`Session` gives it its rank, world size and device, restores the
state to resume from, and stores every checkpoint it hands over, periodic and best alike.

:class:`LocalSession` is one process without Ray; :class:`RaySession` is a Ray Train worker, whose periodic
checkpoints Ray registers (``ray.train.report``). Both keep the best checkpoint in the run's folder through
:class:`~pipeline.io.checkpoints.CheckpointStore`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.io import storage
from pipeline.io.checkpoints import CHECKPOINT_FILE, CheckpointStore, load, save_file

log = logging.getLogger(__name__)


def rng_states(session: Session) -> list[torch.Tensor]:
    """Every rank's torch RNG state, rank 0 first (gathered: a collective that every rank calls)."""
    state = torch.get_rng_state()
    if session.world_size == 1 or not torch.distributed.is_initialized():
        return [state]
    states: list[Any] = [None] * session.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def restore_rng(state: dict[str, Any], session: Session, seed: int) -> None:
    """Each rank continues its own random stream (dropout, augmentation) from the checkpoint, so that a
    resumed run is bit-equal to an uninterrupted one. With another number of workers than the checkpoint's
    (or a checkpoint from before per-rank states), rank 0 continues the saved stream and the others start
    fresh ones: the run resumes correctly, but not bit-equal."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) == session.world_size:
        torch.set_rng_state(per_rank[session.rank])
        return
    if session.rank == 0:
        log.info(
            "resuming %d workers from a checkpoint of %d: the random streams of ranks 1+ start afresh "
            "(a correct resume, not a bit-equal one)",
            session.world_size,
            len(per_rank),
        )
        torch.set_rng_state(per_rank[0])
    else:
        torch.manual_seed(seed * 1000 + session.rank + 1 + state["iteration"] * 7919)


class Session(Protocol):
    """Where the loop runs: its rank, device, how checkpoints are stored and restored."""

    rank: int
    world_size: int
    device: torch.device

    def restore(self) -> dict[str, Any] | None: ...
    def checkpoint(self, state: dict[str, Any] | None, iteration: int, metrics: dict[str, float]) -> None:
        """A periodic checkpoint (``state`` on rank 0, None on the others: every rank calls it)."""

    def save_best(self, state: dict[str, Any]) -> None:
        """The best checkpoint so far (rank 0 only)."""


@dataclass
class LocalSession:
    """One process, no Ray: checkpoints in ``<run_uri>/checkpoints``, the last ``keep`` kept."""

    run_uri: str
    keep: int = 2
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def restore(self) -> dict[str, Any] | None:
        latest = CheckpointStore(self.run_uri).latest()
        return load(latest) if latest else None

    def checkpoint(self, state: dict[str, Any] | None, iteration: int, metrics: dict[str, float]) -> None:
        if state is not None:
            store = CheckpointStore(self.run_uri)
            store.save(state, iteration)
            store.prune(self.keep)

    def save_best(self, state: dict[str, Any]) -> None:
        CheckpointStore(self.run_uri).save_best(state)


@dataclass
class RaySession:
    """The loop's view of a Ray Train worker."""

    rank: int
    world_size: int
    device: torch.device
    run_uri: str  # where the best checkpoint goes
    train_shard: Any = None  # this worker's Ray Data shard when data.loader is "ray"

    resume_from: str | None = None  # a newer checkpoint than Ray's that Ray never registered

    def restore(self) -> dict[str, Any] | None:
        import ray.train  # lazy: a LocalSession runs without Ray

        state = None
        if (checkpoint := ray.train.get_checkpoint()) is not None:
            with checkpoint.as_directory() as folder:
                state = load(str(Path(folder) / CHECKPOINT_FILE))
        if self.resume_from is not None:
            newer = load(self.resume_from)
            if state is None or newer["iteration"] > state["iteration"]:
                log.info(
                    "resuming from %s, which the run wrote but Ray never registered",
                    storage.redact(self.resume_from),
                )
                state = newer
        return state

    def checkpoint(self, state: dict[str, Any] | None, iteration: int, metrics: dict[str, float]) -> None:
        import ray.train  # lazy: a LocalSession runs without Ray

        # report() is a collective: every rank calls it, only rank 0 attaches the checkpoint.
        with tempfile.TemporaryDirectory() as folder:
            attached = None
            if state is not None:
                save_file(folder, state)
                attached = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=attached)

    def save_best(self, state: dict[str, Any]) -> None:
        CheckpointStore(self.run_uri).save_best(state)
