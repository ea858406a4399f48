"""Turn a dataset source into versioned Parquet shards on object storage.

``write_shards(source, out)`` plans the shards of every split deterministically (sorted samples, cut by the
sizes of their files on disk), writes each shard in a worker process (images kept byte for byte, labels
mapped to train ids and re-encoded as PNG), and publishes ``manifest.json`` last. Every shard is written
whole under its final name (storage writes are atomic) and followed by a small receipt, so a re-run skips
finished shards and resumes after a crash; once the manifest exists a re-run only checks it and returns.
A version without a manifest is incomplete and readers refuse it. One preparation writes a version at a time:
it holds a lease (``<version>/run.lease``, :mod:`pipeline.io.lease`), so a second one into the same place,
even with other inputs under the same file names, stops with one line naming the first, and never mixes its
shards into the version.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pipeline.data.schema import (
    MANIFEST_NAME,
    SHARD_SCHEMA,
    Manifest,
    ShardInfo,
    SkippedSample,
    sample_checksum,
    shard_name,
)
from pipeline.data.sources.base import BadSampleError, DatasetSource, SampleRef
from pipeline.io import storage
from pipeline.io.lease import RunLease

log = logging.getLogger(__name__)

RECEIPTS_DIR = "_receipts"
DEFAULT_SHARD_BYTES = 64 * 2**20
DEFAULT_ROW_GROUP_ROWS = 16  # a few MB to tens of MB per row group at Cityscapes size


class PreparationError(RuntimeError):
    """Preparation stopped; the message names the file or URI at fault. Nothing was published."""


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: which samples, where, and how to handle bad ones."""

    source: DatasetSource
    version_uri: str
    split: str
    index: int
    samples: tuple[SampleRef, ...]
    skip_bad: bool
    row_group_rows: int

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @functools.cached_property
    def plan_digest(self) -> str:
        """Identifies the shard's planned content: the source's settings, and its samples in order, each by
        id, files and their sizes on disk. Other inputs under the same file names (another download, another
        generator seed or size) make another plan, so a finished shard or a published version of theirs is
        never taken for this one's."""
        settings = json.dumps(self.source.extra(), sort_keys=True, default=str)
        size = self.source.size_hint
        samples = (f"{ref.sample_id}|{ref.image}|{ref.label}|{size(ref)}" for ref in self.samples)
        return hashlib.sha256("\n".join([settings, *samples]).encode()).hexdigest()


def version_uri(out: str, dataset: str, version: str) -> str:
    """Where a dataset version lives: ``<out>/<dataset>/<version>``."""
    return storage.join(out, dataset, version)


def encode_label(label: np.ndarray) -> bytes:
    """(H, W) uint8 train ids -> 8-bit grayscale PNG bytes (deterministic)."""
    buffer = io.BytesIO()
    Image.fromarray(label, mode="L").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _receipt_uri(task: ShardTask) -> str:
    return storage.join(task.version_uri, RECEIPTS_DIR, f"{task.split}-{task.index:05d}.json")


def _existing_shard(task: ShardTask) -> tuple[ShardInfo, list[SkippedSample]] | None:
    """The receipt of a shard finished by an earlier run with the same plan, if its file is still there."""
    receipt_uri = _receipt_uri(task)
    if not storage.exists(receipt_uri):
        return None
    receipt = json.loads(storage.read_bytes(receipt_uri))
    shard = ShardInfo(**receipt["shard"])
    if receipt.get("plan") != task.plan_digest:
        return None
    if not storage.exists(storage.join(task.version_uri, shard.path)):
        return None
    return shard, [SkippedSample(**item) for item in receipt.get("skipped", [])]


def write_shard(task: ShardTask) -> tuple[ShardInfo, list[SkippedSample]]:
    """Write one shard and its receipt (in a worker process); reuse it when an earlier run finished it."""
    existing = _existing_shard(task)
    if existing is not None:
        return existing
    rows: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    skipped: list[SkippedSample] = []
    for ref in task.samples:
        try:
            sample = task.source.load(ref)
        except BadSampleError as error:
            if not task.skip_bad:
                raise
            skipped.append(SkippedSample(source_path=error.path, reason=error.reason))
            continue
        label = encode_label(sample.label)
        for column, value in (
            ("sample_id", ref.sample_id),
            ("split", ref.split),
            ("image", sample.image),
            ("label", label),
            ("height", sample.height),
            ("width", sample.width),
            ("source_path", ref.image),
            ("checksum", sample_checksum(sample.image, label)),
        ):
            rows[column].append(value)
    buffer = io.BytesIO()
    pq.write_table(
        pa.table(rows, schema=SHARD_SCHEMA), buffer, row_group_size=task.row_group_rows, compression="none"
    )
    data = buffer.getvalue()
    shard = ShardInfo(
        path=task.name,
        split=task.split,
        rows=len(rows["sample_id"]),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    storage.write_bytes(storage.join(task.version_uri, task.name), data)
    receipt = {"plan": task.plan_digest, "shard": asdict(shard), "skipped": [asdict(s) for s in skipped]}
    storage.write_bytes(_receipt_uri(task), json.dumps(receipt).encode())
    return shard, skipped


def plan_shards(
    source: DatasetSource,
    version: str,
    splits: Sequence[str],
    max_shard_bytes: int,
    skip_bad: bool,
    row_group_rows: int,
) -> list[ShardTask]:
    """Cut every split's sorted samples into shards of at most ``max_shard_bytes`` (by size hints)."""
    tasks: list[ShardTask] = []
    for split in splits:
        refs = sorted(source.samples(split), key=lambda ref: ref.sample_id)
        hints = [hint for hint in (source.size_hint(ref) for ref in refs) if hint is not None]
        if len(hints) < len(refs):
            # No file sizes (generated data): measure one sample and assume the rest are alike.
            first = source.load(refs[0])
            hints = [len(first.image) + first.label.size] * len(refs)
        groups: list[list[SampleRef]] = []
        size = 0
        for ref, hint in zip(refs, hints, strict=True):
            if not groups or (size + hint > max_shard_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(ref)
            size += hint
        tasks += [
            ShardTask(source, version, split, index, tuple(group), skip_bad, row_group_rows)
            for index, group in enumerate(groups)
        ]
    return tasks


def _run(tasks: list[ShardTask], workers: int) -> Iterator[tuple[ShardTask, tuple[ShardInfo, list]]]:
    """Write the shards, in this process when ``workers == 1``, else in a pool; yield as they finish."""
    if workers == 1:
        for task in tasks:
            yield task, write_shard(task)
        return
    # spawn, not fork: the parent may hold threads (pyarrow, boto3) that a forked child would inherit locked
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(write_shard, task): task for task in tasks}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for pending in futures:
                pending.cancel()


def write_shards(
    source: DatasetSource,
    out: str,
    *,
    version: str = "v1",
    splits: Sequence[str] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> tuple[str, Manifest]:
    """Prepare ``source`` as shards under ``<out>/<source.name>/<version>`` and publish its manifest.

    Args:
        source: the dataset adapter.
        out: root URI, ``s3://bucket/prefix`` or a local folder.
        version: version name; a published version is immutable.
        splits: which splits (default: the adapter's).
        max_shard_bytes: bound on a shard's size, estimated from the source files' sizes.
        row_group_rows: rows per Parquet row group.
        workers: processes writing shards (default: the available cores).
        skip_bad: leave out bad samples and list them in the manifest instead of stopping.
        progress: show a progress bar.

    Returns:
        ``(version_uri, manifest)``.

    Raises:
        PreparationError: a bad sample (naming its file) without ``skip_bad``, no samples at all, or a
            published version whose content differs from this source.
    """
    splits = tuple(splits or source.splits)
    target = version_uri(out, source.name, version)
    tasks = plan_shards(source, target, splits, max_shard_bytes, skip_bad, row_group_rows)
    if not tasks:
        raise PreparationError(f"{source.root}: no {source.name} samples found in splits {list(splits)}")
    plan = hashlib.sha256("\n".join(f"{t.name}:{t.plan_digest}" for t in tasks).encode()).hexdigest()
    manifest_uri = storage.join(target, MANIFEST_NAME)
    # One writer per version: a second preparation into the same place (other inputs under the same names)
    # stops here, instead of mixing its shards with this one's under checksums that all match.
    name = f"dataset version {source.name}/{version}"
    with RunLease(target, name) as lease:
        published = _published(manifest_uri, plan, target, name)
        if published is not None:
            return target, published
        manifest = _prepare(source, tasks, splits, plan, version, workers, skip_bad, progress)
        manifest.validate(manifest_uri)
        lease.check()  # a writer that lost its lease publishes nothing
        storage.write_bytes(manifest_uri, manifest.to_json().encode())  # published last
    log.info("prepared %s: %s", storage.redact(target), manifest.counts)
    return target, manifest


def _published(manifest_uri: str, plan: str, target: str, name: str) -> Manifest | None:
    """The version's manifest when it is published with this plan; PreparationError when with another."""
    if not storage.exists(manifest_uri):
        return None
    manifest = Manifest.from_json(storage.read_bytes(manifest_uri).decode(), source=manifest_uri)
    if manifest.extra.get("plan") != plan:
        raise PreparationError(
            f"{name} at {storage.redact(target)} is already published with other content (other inputs or "
            "settings); choose another --version"
        )
    log.info("%s is already prepared", storage.redact(target))
    return manifest


def _prepare(
    source: DatasetSource,
    tasks: list[ShardTask],
    splits: tuple[str, ...],
    plan: str,
    version: str,
    workers: int | None,
    skip_bad: bool,
    progress: bool,
) -> Manifest:
    """Writes the shards of ``tasks`` (those with a receipt of this plan kept); returns the manifest."""
    storage.ensure_bucket(tasks[0].version_uri)
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(tasks)))
    total = sum(len(task.samples) for task in tasks)
    results: dict[str, tuple[ShardInfo, list[SkippedSample]]] = {}
    with tqdm(total=total, unit="img", desc=f"{source.name} {version}", disable=not progress) as bar:
        try:
            for task, result in _run(tasks, workers):
                results[task.name] = result
                bar.update(len(task.samples))
        except BadSampleError as error:
            raise PreparationError(f"{error} (use --skip-bad to leave such samples out)") from None
    shards = tuple(results[task.name][0] for task in tasks)
    return Manifest(
        dataset=source.name,
        version=version,
        classes=source.classes,
        palette=source.palette,
        ignore_index=source.ignore_index,
        id_mapping=dict(source.id_mapping),
        counts={split: sum(s.rows for s in shards if s.split == split) for split in splits},
        shards=shards,
        skipped=tuple(item for task in tasks for item in results[task.name][1]),
        extra={**source.extra(), "plan": plan},
    )
