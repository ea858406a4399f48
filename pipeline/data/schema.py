"""The shard format: Parquet columns and the manifest. Writer and readers both import this module.

A prepared dataset version lives under one URI prefix::

    <out>/<dataset>/<version>/
        manifest.json                     # written last: a version without it is incomplete
        shards/<split>-<index:05d>.parquet

Each shard row is one sample; the image keeps the bytes of the source file (no re-encode), the label is a
PNG of train ids (``ignore_index`` for void) after the dataset's id mapping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # the source file's bytes (PNG or JPEG)
        pa.field("label", pa.binary(), nullable=False),  # 8-bit PNG of train ids
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),  # relative to the source root
        pa.field("checksum", pa.string(), nullable=False),  # sample_checksum(image, label)
    ]
)
COLUMNS = tuple(SHARD_SCHEMA.names)


class ManifestError(ValueError):
    """A manifest that cannot be read, or does not describe a valid dataset version."""


def sample_checksum(image: bytes, label: bytes) -> str:
    """sha256 over the image bytes then the label bytes, hex; verified on read."""
    digest = hashlib.sha256()
    digest.update(len(image).to_bytes(8, "little"))
    digest.update(image)
    digest.update(label)
    return digest.hexdigest()


def shard_name(split: str, index: int) -> str:
    """Relative path of a shard inside a dataset version."""
    return f"{SHARDS_DIR}/{split}-{index:05d}.parquet"


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: ``path`` relative to the version prefix, its split, row count, size and sha256."""

    path: str
    split: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SkippedSample:
    """A sample left out (only with an explicit skip flag), with the reason."""

    source_path: str
    reason: str


def _rgb(color: Any) -> tuple[int, int, int]:
    """A palette colour read from JSON; ValueError unless it has exactly three components."""
    red, green, blue = (int(c) for c in color)
    return red, green, blue


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about one prepared dataset version."""

    dataset: str
    version: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    id_mapping: dict[int, int]  # raw label value -> train id (ignore_index for void)
    counts: dict[str, int]  # split -> samples
    shards: tuple[ShardInfo, ...]
    skipped: tuple[SkippedSample, ...] = ()
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # adapter-specific facts, e.g. generator settings

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shards_of(self, split: str) -> tuple[ShardInfo, ...]:
        """The shards of one split, in order; raises ManifestError naming the split when it has none."""
        shards = tuple(shard for shard in self.shards if shard.split == split)
        if not shards:
            raise ManifestError(
                f"dataset {self.dataset}/{self.version} has no split {split!r}; splits: {sorted(self.counts)}"
            )
        return shards

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["id_mapping"] = {str(raw): train for raw, train in self.id_mapping.items()}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        """Parse and validate a manifest; errors name ``source`` and the offending key."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{source}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object")
        expected = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(expected - set(data) - {"skipped", "format_version", "extra"})
        unknown = sorted(set(data) - expected)
        if missing or unknown:
            raise ManifestError(f"{source}: missing keys {missing}, unknown keys {unknown}")
        if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ManifestError(f"{source}: format_version {data['format_version']} is not {FORMAT_VERSION}")
        try:
            manifest = cls(
                dataset=str(data["dataset"]),
                version=str(data["version"]),
                classes=tuple(str(name) for name in data["classes"]),
                palette=tuple(_rgb(color) for color in data["palette"]),
                ignore_index=int(data["ignore_index"]),
                id_mapping={int(raw): int(train) for raw, train in data["id_mapping"].items()},
                counts={str(split): int(count) for split, count in data["counts"].items()},
                shards=tuple(ShardInfo(**shard) for shard in data["shards"]),
                skipped=tuple(SkippedSample(**item) for item in data.get("skipped", [])),
                extra=dict(data.get("extra", {})),
            )
        except (TypeError, ValueError, AttributeError) as error:
            raise ManifestError(f"{source}: malformed field ({error})") from None
        manifest.validate(source)
        return manifest

    def validate(self, source: str = "manifest") -> None:
        """Check internal consistency; raises ManifestError naming ``source`` and the problem."""
        if len(self.palette) != len(self.classes):
            raise ManifestError(
                f"{source}: {len(self.palette)} palette colours for {len(self.classes)} classes"
            )
        for shard in self.shards:
            if shard.path.startswith("/") or ".." in shard.path.split("/"):
                raise ManifestError(f"{source}: shard path {shard.path!r} escapes the dataset prefix")
        for split, count in self.counts.items():
            rows = sum(shard.rows for shard in self.shards if shard.split == split)
            if rows != count:
                raise ManifestError(
                    f"{source}: split {split!r} counts {count} samples but its shards hold {rows}"
                )
