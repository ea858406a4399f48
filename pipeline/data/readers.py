"""Reading prepared dataset versions: the manifest, whole shards, a torch Dataset and a Ray Dataset.

Everything goes through :mod:`pipeline.io.storage`, so a version URI may be a local folder or ``s3://``. Reads
are verified: a shard's sha256 against the manifest, its schema against ``SHARD_SCHEMA``, and every row's
checksum against its bytes; any mismatch raises ValueError naming the shard (and sample).

Two ways to iterate a split:

- :class:`ShardDataset`, a map-style ``torch.utils.data.Dataset`` for plain PyTorch (no Ray needed);
- :func:`ray_dataset`, a ``ray.data.Dataset`` for Ray Train workers.

Both decode and transform each sample under ``seeded(sample_seed(seed, epoch, sample_id))``, so a sample's
augmentation is the same in both, with any number of workers and any batching.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from pipeline.data.schema import MANIFEST_NAME, SHARD_SCHEMA, Manifest, ShardInfo, sample_checksum
from pipeline.data.transforms import JointTransform, decode_sample, sample_seed, seeded
from pipeline.io import storage

if TYPE_CHECKING:
    import ray.data

# What the Ray path reads: the rest of the row (sizes, source path) is not needed for training.
RAY_COLUMNS = ("sample_id", "image", "label", "checksum")


def open_manifest(uri: str) -> Manifest:
    """Read and validate ``<uri>/manifest.json``.

    Raises:
        FileNotFoundError: the version has no manifest (not prepared, or preparation did not finish).
        ManifestError: the manifest is malformed; the message names its URI.
    """
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(
            f"{storage.redact(uri)}: no {MANIFEST_NAME} (dataset not prepared, or preparation did not finish)"
        )
    return Manifest.from_json(storage.read_bytes(manifest_uri).decode("utf-8"), source=manifest_uri)


def _check_schema(schema: pa.Schema, shard_uri: str) -> None:
    if schema.equals(SHARD_SCHEMA, check_metadata=False):
        return
    missing = [name for name in SHARD_SCHEMA.names if name not in schema.names]
    extra = [name for name in schema.names if name not in SHARD_SCHEMA.names]
    changed = [
        f"{field.name}: {schema.field(field.name).type} (expected {field.type})"
        for field in SHARD_SCHEMA
        if field.name in schema.names and schema.field(field.name).type != field.type
    ]
    raise ValueError(
        f"{shard_uri}: not a shard of this format; missing columns {missing}, extra columns {extra}"
        + (f", wrong types {changed}" if changed else "")
    )


def verify_row(where: str, sample_id: str, image: bytes, label: bytes, checksum: str) -> None:
    """Raise ValueError naming ``where`` (a shard) and the sample when its bytes differ from ``checksum``."""
    if sample_checksum(image, label) != checksum:
        raise ValueError(f"{where}: sample {sample_id!r} does not match its checksum (corrupted row)")


def read_shard(uri: str, shard: ShardInfo, verify: bool = True) -> pa.Table:
    """Read one whole shard of the version at ``uri`` into memory.

    Args:
        uri: the dataset version prefix.
        shard: the shard's manifest entry.
        verify: check the file's sha256 and every row's checksum (schema and row count are always checked).

    Returns:
        A table with ``SHARD_SCHEMA`` and ``shard.rows`` rows.

    Raises:
        ValueError: naming the shard URI (and the sample, for a bad row) when the file is corrupted,
            truncated, not Parquet, of another schema, or holds other rows than the manifest says.
    """
    shard_uri = storage.join(uri, shard.path)
    data = storage.read_bytes(shard_uri)
    shard_uri = storage.redact(shard_uri)  # from here on it only names the shard in errors
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise ValueError(f"{shard_uri}: sha256 {digest} does not match the manifest's {shard.sha256}")
    try:
        # One thread, and none of Arrow's pools: the bytes are in memory already, and pq.read_table's
        # dataset scanner starts pool threads whose teardown at exit now and then aborted the process
        # ("terminate called without an active exception", apache/arrow#34314) after a refused shard.
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{shard_uri}: not a readable Parquet file ({error})") from None
    _check_schema(table.schema, shard_uri)
    if table.num_rows != shard.rows:
        raise ValueError(f"{shard_uri}: {table.num_rows} rows, the manifest says {shard.rows}")
    splits = set(table.column("split").unique().to_pylist())
    if splits - {shard.split}:
        raise ValueError(f"{shard_uri}: rows of splits {sorted(splits)} in a {shard.split!r} shard")
    if verify:
        columns = [table.column(name).to_pylist() for name in RAY_COLUMNS]
        for row in zip(*columns, strict=True):
            verify_row(shard_uri, *row)
    return table


def _apply(
    image_bytes: bytes, label_bytes: bytes, transform: JointTransform | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode, then transform under ``seeded(seed)``; plain tensors, label as int64."""
    image, mask = decode_sample(image_bytes, label_bytes)
    if transform is not None:
        with seeded(seed):
            image, mask = transform(image, mask)
    # Plain tensors: tv_tensor subclasses are not what the model and collate functions expect.
    return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).to(torch.int64)


class ShardDataset(Dataset):
    """One split of a prepared dataset version, as a map-style torch Dataset.

    Sample ``i`` is row ``i - offset`` of the shard that holds it, in manifest order. Construction reads only
    the manifest (none when ``manifest`` is given: the one a run read already); shards are read (and
    verified) on first use, keeping the last ``cache_shards`` in memory per process. The object holds no open
    files and pickles without its cache, so DataLoader workers each build their own.

    Items are ``{"image": (3, h, w), "label": (h, w) int64, "sample_id": str}``: after ``transform`` when
    given (float32 image), else the decoded uint8 image. ``set_epoch`` reaches DataLoader workers only when
    they are started per epoch (``persistent_workers=False``, the default).
    """

    def __init__(
        self,
        uri: str,
        split: str,
        transform: JointTransform | None = None,
        seed: int = 0,
        verify: bool = True,
        cache_shards: int = 2,
        manifest: Manifest | None = None,
    ) -> None:
        self.uri = uri
        self.split = split
        self.transform = transform
        self.seed = seed
        self.verify = verify
        self.cache_shards = max(1, cache_shards)
        self.epoch = 0
        self.manifest = manifest if manifest is not None else open_manifest(uri)
        self.shards = self.manifest.shards_of(split)
        # offsets[k] = index of shard k's first sample; a sample's shard is found by bisection.
        self._offsets = np.cumsum([0] + [shard.rows for shard in self.shards]).tolist()
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def ignore_index(self) -> int:
        return self.manifest.ignore_index

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw: the same (seed, epoch, sample) always gives the same result."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # workers read their own shards; don't ship tables through pickle
        return state

    def _table(self, index: int) -> pa.Table:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        table = read_shard(self.uri, self.shards[index], verify=self.verify)
        self._cache[index] = table
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return table

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples of split {self.split!r}")
        i %= len(self)
        shard_index = bisect.bisect_right(self._offsets, i) - 1
        table = self._table(shard_index)
        row = i - self._offsets[shard_index]
        sample_id = table.column("sample_id")[row].as_py()
        image, label = _apply(
            table.column("image")[row].as_py(),
            table.column("label")[row].as_py(),
            self.transform,
            sample_seed(self.seed, self.epoch, sample_id),
        )
        return {"image": image, "label": label, "sample_id": sample_id}


def _decode_batch(
    batch: pa.Table, transform: JointTransform | None, seed: int, epoch: int | None, verify: bool
) -> dict[str, np.ndarray]:
    """Ray ``map_batches`` body: verify, decode and transform a batch of rows.

    Returns:
        ``image`` (N, 3, h, w), ``label`` (N, h, w) int64 and ``sample_id`` (N,) — images float32 after a
        transform, uint8 without one. Rows of different sizes (no cropping transform) come back as object
        arrays of per-row arrays, which Ray stores as variable-shaped tensors.
    """
    sample_ids = batch.column("sample_id").to_pylist()
    images = batch.column("image").to_pylist()
    labels = batch.column("label").to_pylist()
    if verify:
        # Rows of one batch may come from several shards: name each row's own file.
        columns = [batch.column(name).to_pylist() for name in ("path", *RAY_COLUMNS)]
        for row in zip(*columns, strict=True):
            verify_row(*row)
    # epoch None: a fresh augmentation at every pass over the data (streaming training).
    nonce = secrets.randbits(62) if epoch is None else epoch
    pairs = [
        _apply(image, label, transform, sample_seed(seed, nonce, sample_id))
        for sample_id, image, label in zip(sample_ids, images, labels, strict=True)
    ]
    return {
        "image": _stack([image.numpy() for image, _ in pairs]),
        "label": _stack([label.numpy() for _, label in pairs]),
        "sample_id": np.array(sample_ids, dtype=object),
    }


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    if len({array.shape for array in arrays}) <= 1:
        return np.stack(arrays)
    ragged = np.empty(len(arrays), dtype=object)
    ragged[:] = arrays
    return ragged


def ray_dataset(
    uri: str,
    split: str,
    transform: JointTransform | None = None,
    seed: int = 0,
    batch_size: int = 8,
    epoch: int | None = 0,
    verify: bool = True,
    num_cpus: float = 0.5,
    concurrency: int | None = None,
    manifest: Manifest | None = None,
) -> ray.data.Dataset:
    """One split as a lazy Ray Dataset of decoded, transformed samples.

    Rows are read straight from the shard files (no whole-file sha256 check: Ray reads them in pieces);
    every row's checksum is verified in the map step, which raises ValueError naming the shard file (its
    path inside the filesystem) and the sample_id.

    Args:
        uri: the dataset version prefix (local folder or ``s3://``).
        split: which split's shards to read.
        transform: joint transform as for :class:`ShardDataset`; None keeps decoded uint8 images.
        seed, epoch: with the sample_id, select each sample's augmentation (batching does not matter);
            ``epoch=None`` draws a new augmentation at every pass instead (not reproducible).
        batch_size: rows per ``map_batches`` call.
        verify: check row checksums.
        num_cpus: CPUs requested per read and per map task; fractional so that reading runs next to
            trainers on a small machine.
        concurrency: at most this many map tasks at once (None: Ray decides).
        manifest: the version's manifest when the caller read it already.

    Returns:
        A dataset of rows ``{"image", "label", "sample_id"}`` shaped as in :func:`_decode_batch`.
    """
    import ray.data  # lazily: the plain-torch path must not need Ray

    shards = (manifest if manifest is not None else open_manifest(uri)).shards_of(split)
    filesystem, _ = storage.filesystem(uri)
    paths = [storage.filesystem(storage.join(uri, shard.path))[1] for shard in shards]
    # select_columns (read_parquet's columns= is deprecated) is pushed down into the read by Ray's optimizer.
    dataset = ray.data.read_parquet(
        paths, filesystem=filesystem, partitioning=None, include_paths=True, num_cpus=num_cpus
    )
    return dataset.select_columns([*RAY_COLUMNS, "path"]).map_batches(
        functools.partial(_decode_batch, transform=transform, seed=seed, epoch=epoch, verify=verify),
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
        num_cpus=num_cpus,
    )
