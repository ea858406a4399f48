"""The shard writer: layout, manifest, idempotence, resume, bad input, object storage."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.schema import MANIFEST_NAME, SHARD_SCHEMA, Manifest, sample_checksum
from pipeline.data.sources.base import DatasetSource, SampleRef
from pipeline.data.writer import PreparationError, write_shards
from pipeline.io import storage


class TinySource(DatasetSource):
    """``<split>/<name>.png`` images with ``<split>annot/<name>.png`` labels; raw 9 is void."""

    name = "tiny"
    classes = ("a", "b", "c")
    palette = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
    id_mapping = {0: 0, 1: 1, 2: 2, 9: 255}
    splits = ("train", "val")

    def samples(self, split: str) -> Iterator[SampleRef]:
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: split folder is missing")
        for path in sorted(folder.glob("*.png")):
            label = f"{split}annot/{path.name}"
            yield SampleRef(f"{split}-{path.stem}", split, f"{split}/{path.name}", label)


class ExplodingSource(TinySource):
    """Dies (not a bad sample: a crash) when it reaches one sample."""

    explode_at = "train-003"

    def load(self, ref: SampleRef):  # noqa: ANN201 - same as the base
        if ref.sample_id == self.explode_at:
            raise RuntimeError("simulated crash")
        return super().load(ref)


def make_tiny(root: Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (24, 32)) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (counts or {"train": 5, "val": 2}).items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for index in range(count):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            label = rng.choice(np.array([0, 1, 2, 9], dtype=np.uint8), size=size)
            Image.fromarray(image).save(root / split / f"{index:03d}.png")
            Image.fromarray(label, mode="L").save(root / f"{split}annot" / f"{index:03d}.png")
    return root


def read_rows(version: str, manifest: Manifest) -> list[dict]:
    rows = []
    for shard in manifest.shards:
        data = storage.read_bytes(storage.join(version, shard.path))
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
        table = pq.read_table(io.BytesIO(data))
        assert table.schema.equals(SHARD_SCHEMA) and table.num_rows == shard.rows
        rows += table.to_pylist()
    return rows


def test_layout_manifest_and_rows(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "src")
    version, manifest = write_shards(TinySource(root), str(tmp_path / "out"), workers=1, progress=False)
    assert version == str(tmp_path / "out" / "tiny" / "v1")
    assert manifest.counts == {"train": 5, "val": 2}
    assert manifest.id_mapping == {0: 0, 1: 1, 2: 2, 9: 255} and manifest.classes == ("a", "b", "c")
    assert Manifest.from_json((Path(version) / MANIFEST_NAME).read_text()) == manifest
    rows = read_rows(version, manifest)
    assert [row["sample_id"] for row in rows] == [f"train-{i:03d}" for i in range(5)] + ["val-000", "val-001"]
    for row in rows:
        source_file = root / row["source_path"]
        assert row["image"] == source_file.read_bytes()  # kept as it is, no re-encode
        raw = np.array(Image.open(root / f"{row['split']}annot" / source_file.name))
        expected = np.where(raw == 9, 255, raw)
        assert np.array_equal(np.array(Image.open(io.BytesIO(row["label"]))), expected)
        assert (row["height"], row["width"]) == (24, 32)
        assert row["checksum"] == sample_checksum(row["image"], row["label"])


def test_shards_are_bounded_and_work_spreads_over_processes(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "src", {"train": 7, "val": 3})
    source = TinySource(root)
    hints = {ref.sample_id: source.size_hint(ref) for split in source.splits for ref in source.samples(split)}
    bound = 3 * max(hints.values())
    out = str(tmp_path / "out")
    version, manifest = write_shards(source, out, max_shard_bytes=bound, workers=2, progress=False)
    rows = read_rows(version, manifest)
    assert [row["sample_id"] for row in rows] == sorted(hints)  # every sample once, in order
    assert len(manifest.shards_of("train")) >= 3
    start = 0
    for shard in manifest.shards:
        ids = [row["sample_id"] for row in rows[start : start + shard.rows]]
        start += shard.rows
        assert all(sample_id.startswith(shard.split) for sample_id in ids)
        assert sum(hints[sample_id] for sample_id in ids) <= bound


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "src")
    version, first = write_shards(TinySource(root), str(tmp_path / "out"), workers=1, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in Path(version).rglob("*") if p.is_file()}
    _, second = write_shards(TinySource(root), str(tmp_path / "out"), workers=1, progress=False)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in Path(version).rglob("*") if p.is_file()} == stamps


def test_resume_after_a_crash_rewrites_only_missing_shards(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "src", {"train": 6, "val": 2})
    options = dict(max_shard_bytes=1, workers=1, progress=False)  # one sample per shard
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(ExplodingSource(root), str(tmp_path / "out"), **options)
    version = tmp_path / "out" / "tiny" / "v1"
    assert not (version / MANIFEST_NAME).exists()  # nothing published
    written = sorted(p.name for p in (version / "shards").iterdir())
    assert written == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]  # up to the crash
    stamps = {name: (version / "shards" / name).stat().st_mtime_ns for name in written}
    _, manifest = write_shards(TinySource(root), str(tmp_path / "out"), **options)
    assert {name: (version / "shards" / name).stat().st_mtime_ns for name in written} == stamps  # reused
    assert manifest.counts == {"train": 6, "val": 2} and len(manifest.shards) == 8
    assert [row["sample_id"] for row in read_rows(str(version), manifest)][:6] == [
        f"train-{i:03d}" for i in range(6)
    ]


def test_bad_sample_stops_with_its_file_name_and_publishes_nothing(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "src")
    Image.fromarray(np.full((24, 32), 7, dtype=np.uint8), mode="L").save(root / "trainannot" / "002.png")
    with pytest.raises(PreparationError, match=r"trainannot/002.png: label values \[7\] are outside"):
        write_shards(TinySource(root), str(tmp_path / "out"), workers=2, progress=False)
    assert not (tmp_path / "out" / "tiny" / "v1" / MANIFEST_NAME).exists()


def test_skip_bad_lists_them_in_the_manifest(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "src")
    (root / "train" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "valannot" / "001.png").unlink()
    version, manifest = write_shards(
        TinySource(root), str(tmp_path / "out"), skip_bad=True, workers=1, progress=False
    )
    assert manifest.counts == {"train": 4, "val": 1}
    reasons = {Path(item.source_path).relative_to(root).as_posix(): item.reason for item in manifest.skipped}
    assert reasons.keys() == {"train/001.png", "valannot/001.png"}
    assert "unreadable image" in reasons["train/001.png"] and "missing" in reasons["valannot/001.png"]
    assert len(read_rows(version, manifest)) == 5


def test_empty_dataset_and_missing_split_are_errors(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "src", {"train": 0, "val": 0})
    with pytest.raises(PreparationError, match="no tiny samples found"):
        write_shards(TinySource(root), str(tmp_path / "out"), workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="test: split folder is missing"):
        write_shards(TinySource(root), str(tmp_path / "out"), splits=["test"], workers=1, progress=False)


def test_published_version_is_immutable(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "src")
    write_shards(TinySource(root), str(tmp_path / "out"), workers=1, progress=False)
    make_tiny(tmp_path / "other", {"train": 3, "val": 1})
    with pytest.raises(PreparationError, match="already published with other content"):
        write_shards(TinySource(tmp_path / "other"), str(tmp_path / "out"), workers=1, progress=False)
    _, manifest = write_shards(
        TinySource(tmp_path / "other"), str(tmp_path / "out"), version="v2", workers=1, progress=False
    )
    assert manifest.counts == {"train": 3, "val": 1}


@pytest.mark.integration
def test_round_trip_through_s3(tmp_path: Path, s3_env: str) -> None:
    root = make_tiny(tmp_path / "src")
    version, manifest = write_shards(TinySource(root), s3_env + "/datasets", workers=2, progress=False)
    assert version == s3_env + "/datasets/tiny/v1"
    published = Manifest.from_json(storage.read_bytes(storage.join(version, MANIFEST_NAME)).decode())
    assert published == manifest
    assert len(read_rows(version, manifest)) == 7
    receipts = storage.list_files(storage.join(version, "_receipts"))
    assert len(receipts) == len(manifest.shards)
    assert json.loads(storage.read_bytes(storage.join(version, "_receipts", receipts[0])))["shard"]


@pytest.mark.integration
def test_shard_dataset_reads_from_s3(tmp_path: Path, s3_env: str) -> None:
    from pipeline.data.readers import ShardDataset

    root = make_tiny(tmp_path / "src")
    version, _ = write_shards(TinySource(root), s3_env, workers=1, progress=False)
    dataset = ShardDataset(version, "val")
    assert [dataset[i]["sample_id"] for i in range(len(dataset))] == ["val-000", "val-001"]
    raw = np.array(Image.open(root / "valannot" / "001.png"))
    assert np.array_equal(dataset[1]["label"].numpy(), np.where(raw == 9, 255, raw))


def test_other_inputs_under_the_same_names_are_another_plan(tmp_path: Path) -> None:
    """Another download (files of other sizes under the same names) or another generator seed or size is
    refused against a published version, and never reuses a finished shard of the other inputs."""
    from pipeline.data.sources import build_source

    out = str(tmp_path / "out")
    write_shards(
        build_source("generated", None, image_size=(32, 32), counts={"train": 2, "val": 1}),
        out,
        workers=1,
        progress=False,
    )
    for options in ({"seed": 1}, {"image_size": (40, 40)}):
        settings = {"image_size": (32, 32), "counts": {"train": 2, "val": 1}, **options}
        with pytest.raises(PreparationError, match="already published with other content"):
            write_shards(build_source("generated", None, **settings), out, workers=1, progress=False)
    root = make_tiny(tmp_path / "src")
    write_shards(TinySource(root), out, workers=1, progress=False)
    first = next((root / "train").glob("*"))
    first.write_bytes(first.read_bytes() + b"\0")  # the same name, other content and size
    with pytest.raises(PreparationError, match="already published with other content"):
        write_shards(TinySource(root), out, workers=1, progress=False)
