"""What a run decides once, at its start, and hands on built: :class:`RunContext`.

A training (``run_training``) and a search (``run_search``) each open one::

    config = resolve(config)                  # absolute paths; the not-pretrained warning, once
    with open_run(config, config.run.name, f"run {config.run.name!r}") as run:
        ...                                   # run.spec (config, name, run_uri, tracking_uri, manifest)

Opening it reads the dataset's manifest and checks the run (splits, shards, a continued run's identity, the
model and its weights), connects to Ray when the run uses it (workers that cannot be placed are refused
before anything is written), takes the run's lease (one writer per run), resolves the tracking URI and
starts the tracker (the MLflow run of that name continues when the run resumes). What it decided is the
run's :class:`~pipeline.train.spec.RunSpec`, which every process of the run receives instead of deciding
again. Leaving it ends the tracker with the run's status (FINISHED, or FAILED / KILLED when an error or
Ctrl-C leaves the block). Every other tracker of a run (a trial's nested run, the rank-0 worker's,
``ccnet evaluate``'s) comes from :func:`start_tracker`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.config.model import build_model, warn_if_not_pretrained
from pipeline.data.readers import open_manifest
from pipeline.data.schema import Manifest
from pipeline.io import storage
from pipeline.io.lease import LEASE_FILE, RunLease
from pipeline.tracking import open_tracker, resolve_tracking_uri
from pipeline.tracking.base import Tracker
from pipeline.train.identity import (
    IDENTITY_FILE,
    check_continuation,
    read_identity,
    run_identity,
    write_identity,
)
from pipeline.train.spec import RunSpec, class_weights, run_uri_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """An open run in its driver.

    Attributes:
        spec: what the run decided (:class:`~pipeline.train.spec.RunSpec`), for every process of it.
        tracker: its started tracker (a :class:`~pipeline.tracking.base.NullTracker` when tracking is optional
            and the store is down).
        lease: the run's lease; :meth:`RunLease.check` before publishing anything as this run's.
    """

    spec: RunSpec
    tracker: Tracker
    lease: RunLease

    @property
    def config(self) -> Config:
        return self.spec.config


def resolve(config: Config) -> Config:
    """The config as a run uses it: every location absolute (relative ones logged once)."""
    config = config.with_absolute_paths()
    warn_if_not_pretrained(config)
    return config


def check_data(config: Config, manifest: Manifest) -> None:
    """The splits the run reads exist, and each of their shards is there with the manifest's size (a
    missing or truncated shard otherwise surfaces in a DataLoader worker, mid-run)."""
    splits = {"data.train_split": config.data.train_split, "data.val_split": config.data.val_split}
    for key, split in splits.items():
        try:
            shards = manifest.shards_of(split)
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from None
        for shard in shards:
            uri = storage.join(config.data.uri, shard.path)
            try:
                found = storage.size(uri)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"data.uri: shard {storage.redact(uri)} of dataset "
                    f"{manifest.dataset}/{manifest.version} is missing"
                ) from None
            if found != shard.bytes:
                raise ValueError(
                    f"data.uri: shard {storage.redact(uri)} has {found} bytes, its manifest "
                    f"says {shard.bytes}: the version was changed after it was published"
                )


def end_status(error: BaseException) -> str:
    """The tracking status of a run that ``error`` stopped: KILLED for Ctrl-C and for a stop asked from
    outside (Tune stopping a trial ends its thread with ``sys.exit(0)``), else FAILED."""
    stopped = isinstance(error, SystemExit) and error.code in (0, None)
    return "KILLED" if isinstance(error, KeyboardInterrupt) or stopped else "FAILED"


def start_tracker(
    config: Config,
    tracking_uri: str,
    name: str,
    *,
    run_id: str | None = None,
    resume: bool = False,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    required: bool | None = None,
    announce: bool = True,
) -> Tracker:
    """A started tracker for run ``name``: continues ``run_id``, or with ``resume`` the latest run of that
    name, nested under ``parent_run_id`` when given; ``required`` (default ``tracking.required``) decides
    whether an unusable store is fatal; ``announce`` False keeps the run's line off the console (a process
    that continues a run the driver announced)."""
    tracker = open_tracker(
        tracking_uri,
        config.tracking.experiment,
        required=config.tracking.required if required is None else required,
        settle_timeout=config.tracking.settle_timeout,
    )
    tracker.start(
        name, run_id=run_id, tags=tags, announce=announce, resume=resume, parent_run_id=parent_run_id
    )
    return tracker


@contextlib.contextmanager
def ended_with_status(tracker: Tracker) -> Iterator[Tracker]:
    """Ends ``tracker`` when the block ends: FINISHED, or the status of the error that left it (never left
    RUNNING)."""
    try:
        yield tracker
    except BaseException as error:
        tracker.end(end_status(error))
        raise
    tracker.end()


@contextlib.contextmanager
def open_run(
    config: Config,
    name: str,
    what: str,
    *,
    tags: dict[str, str] | None = None,
    resume: bool | None = None,
    driver_cpus: float = 0.0,
    search: bool = False,
) -> Iterator[RunContext]:
    """Opens run ``name`` of the resolved ``config`` (see the module's docstring).

    Args:
        what: how the lease names the run in a refusal (``run 'x'``, ``search 'y'``).
        resume: continue the latest tracked run of that name; default: when its storage holds files.
        driver_cpus: CPUs this process's own Ray tasks take beside the workers (a search's trial drivers).
        search: the run is a search's parent: its identity holds the search's definition, and continuing
            it under another is refused (:mod:`pipeline.train.identity`).
    """
    # Every check that can run here runs before Ray, the lease and tracking: a refused run leaves nothing.
    run_uri = run_uri_of(config.run.storage, name)
    manifest = open_manifest(config.data.uri)
    check_data(config, manifest)
    weights = class_weights(config, manifest)
    if weights is not None:
        named = ", ".join(f"{c} {w:.3g}" for c, w in zip(manifest.classes, weights, strict=True))
        log.info(
            "class weights (%s, %s split): %s", config.train.class_weights, config.data.train_split, named
        )
    saved = read_identity(run_uri)
    if saved is not None:
        check_continuation(saved, config, manifest, what, search=search)
    build_model(config, manifest.num_classes)  # the model and its pretrained weights, as the workers will
    if config.run.ray:
        from pipeline.train.resources import connect  # Ray starts only for runs that use it

        connect(config, driver_cpus=driver_cpus)
    with RunLease(run_uri, what, ttl=config.run.lease_ttl) as lease:
        tracking_uri = resolve_tracking_uri(config.tracking.uri)
        if resume is None:
            resume = any(file not in (LEASE_FILE, IDENTITY_FILE) for file in storage.list_files(run_uri))
        tracker = start_tracker(config, tracking_uri, name, resume=resume, tags=tags)
        if saved is None:  # once tracking started: a refused start leaves the run's folder as it was
            write_identity(run_uri, run_identity(config, manifest, search=search))
        spec = RunSpec(config, name, run_uri, tracking_uri, manifest, class_weights=weights)
        with ended_with_status(tracker):
            yield RunContext(spec, tracker, lease)
