"""Readers: manifest, verified shard reads, the torch ShardDataset and the Ray Dataset, on local folders."""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.data.readers import ShardDataset, open_manifest, ray_dataset, read_shard
from pipeline.data.schema import MANIFEST_NAME, SHARD_SCHEMA, Manifest, ShardInfo, sample_checksum, shard_name
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform

CLASSES = ("road", "car", "sky", "tree")
IGNORE = 255
# Shards of train: two of 4 and 3 rows, the second with another image size; val: one shard of 3 rows.
LAYOUT = {"train": [(4, (20, 28)), (3, (16, 24))], "val": [(3, (20, 28))]}

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # sample_id -> (image (H, W, 3) uint8, label (H, W) uint8)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_bytes(rows: list[dict], schema: pa.Schema = SHARD_SCHEMA) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


def write_dataset(root: Path, layout: dict = LAYOUT, seed: int = 0) -> tuple[str, Arrays]:
    """A dataset version as the shard writer lays it out; returns its URI and the source arrays by id."""
    rng = np.random.default_rng(seed)
    arrays: Arrays = {}
    shards = []
    for split, parts in layout.items():
        number = 0
        for index, (count, (height, width)) in enumerate(parts):
            rows = []
            for _ in range(count):
                sample_id = f"{split}-{number:04d}"
                number += 1
                image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                label = rng.choice(np.array([0, 1, 2, 3, IGNORE], np.uint8), size=(height, width))
                arrays[sample_id] = (image, label)
                image_bytes, label_bytes = png(image), png(label)
                rows.append(
                    {
                        "sample_id": sample_id,
                        "split": split,
                        "image": image_bytes,
                        "label": label_bytes,
                        "height": height,
                        "width": width,
                        "source_path": f"{split}/{sample_id}.png",
                        "checksum": sample_checksum(image_bytes, label_bytes),
                    }
                )
            data = shard_bytes(rows)
            path = shard_name(split, index)
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
            shards.append(ShardInfo(path, split, count, len(data), hashlib.sha256(data).hexdigest()))
    manifest = Manifest(
        dataset="tiny",
        version="v1",
        classes=CLASSES,
        palette=((0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)),
        ignore_index=IGNORE,
        id_mapping={0: 0, 1: 1, 2: 2, 3: 3, 9: IGNORE},
        counts={split: sum(count for count, _ in parts) for split, parts in layout.items()},
        shards=tuple(shards),
    )
    (root / MANIFEST_NAME).write_text(manifest.to_json())
    return str(root), arrays


def replace_shard(uri: str, index: int, data: bytes) -> tuple[Manifest, ShardInfo]:
    """Overwrite a shard's file and fix up its manifest entry, so only the content is wrong."""
    manifest = open_manifest(uri)
    old = manifest.shards[index]
    shard = ShardInfo(old.path, old.split, old.rows, len(data), hashlib.sha256(data).hexdigest())
    (Path(uri) / shard.path).write_bytes(data)
    shards = list(manifest.shards)
    shards[index] = shard
    manifest = Manifest(**{**manifest.__dict__, "shards": tuple(shards)})
    (Path(uri) / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest, shard


def tamper_row(uri: str, index: int, row: int) -> str:
    """Change one pixel of a row's label without updating its checksum; returns the sample_id."""
    shard = open_manifest(uri).shards[index]
    rows = pq.read_table(Path(uri) / shard.path).to_pylist()
    label = np.array(Image.open(io.BytesIO(rows[row]["label"])))
    label[0, 0] = 3 if label[0, 0] != 3 else 2
    rows[row]["label"] = png(label)
    replace_shard(uri, index, shard_bytes(rows))
    return rows[row]["sample_id"]


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[str, Arrays]:
    return write_dataset(tmp_path / "tiny" / "v1")


def eval_oracle(image: np.ndarray) -> np.ndarray:
    """(x / 255 - mean) / std as (3, H, W), computed independently of torchvision."""
    mean, std = np.reshape(IMAGENET_MEAN, (3, 1, 1)), np.reshape(IMAGENET_STD, (3, 1, 1))
    return (image.transpose(2, 0, 1) / 255.0 - mean) / std


# --- open_manifest / read_shard ---


def test_open_manifest(dataset: tuple[str, Arrays]) -> None:
    uri, _ = dataset
    manifest = open_manifest(uri)
    assert manifest.counts == {"train": 7, "val": 3} and manifest.classes == CLASSES


def test_open_manifest_missing_names_the_uri(tmp_path: Path) -> None:
    uri = str(tmp_path / "not-prepared")
    with pytest.raises(FileNotFoundError, match="not-prepared: no manifest.json"):
        open_manifest(uri)


def test_read_shard_returns_verified_table(dataset: tuple[str, Arrays]) -> None:
    uri, arrays = dataset
    shard = open_manifest(uri).shards[1]
    table = read_shard(uri, shard)
    assert table.schema.equals(SHARD_SCHEMA) and table.num_rows == 3
    assert table.column("sample_id").to_pylist() == ["train-0004", "train-0005", "train-0006"]


def test_read_shard_detects_tampered_file(dataset: tuple[str, Arrays]) -> None:
    uri, _ = dataset
    shard = open_manifest(uri).shards[0]
    path = Path(uri) / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-00000\.parquet: sha256 .* does not match"):
        read_shard(uri, shard)


def test_read_shard_rejects_foreign_parquet(dataset: tuple[str, Arrays]) -> None:
    uri, _ = dataset
    foreign = shard_bytes(
        [{"sample_id": "x", "pixels": b"..."}], pa.schema({"sample_id": pa.string(), "pixels": pa.binary()})
    )
    _, shard = replace_shard(uri, 0, foreign)
    with pytest.raises(ValueError, match=r"train-00000\.parquet: not a shard") as error:
        read_shard(uri, shard)
    message = str(error.value)
    assert "extra columns ['pixels']" in message and "'checksum'" in message and "'image'" in message


def test_read_shard_rejects_truncated_file(dataset: tuple[str, Arrays]) -> None:
    uri, _ = dataset
    data = (Path(uri) / open_manifest(uri).shards[0].path).read_bytes()
    _, shard = replace_shard(uri, 0, data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"train-00000\.parquet: not a readable Parquet file"):
        read_shard(uri, shard)


def test_read_shard_detects_row_checksum_mismatch(dataset: tuple[str, Arrays]) -> None:
    uri, _ = dataset
    sample_id = tamper_row(uri, 1, 2)
    shard = open_manifest(uri).shards[1]
    with pytest.raises(ValueError, match=rf"train-00001\.parquet: sample '{sample_id}' does not match"):
        read_shard(uri, shard)
    assert read_shard(uri, shard, verify=False).num_rows == 3  # verify=False skips the row check


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_read_shard_starts_no_native_thread(dataset: tuple[str, Arrays]) -> None:
    """Arrow's pool threads, once started, sometimes aborted the process at exit ("terminate called without an
    active exception", exit 134) after a refused shard: read_shard starts none, for a good or a bad shard."""
    uri, _ = dataset
    tamper_row(uri, 1, 0)
    script = f"""
import os
from pipeline.data.readers import open_manifest, read_shard
good, bad = open_manifest({uri!r}).shards[:2]
before = set(os.listdir("/proc/self/task"))
read_shard({uri!r}, good)
try:
    read_shard({uri!r}, bad)
except ValueError:
    pass
print(len(set(os.listdir("/proc/self/task")) - before))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[3],
    )
    assert result.stdout.strip() == "0", result.stderr


# --- ShardDataset ---


def test_shard_dataset_order_ids_and_eval_values(dataset: tuple[str, Arrays]) -> None:
    uri, arrays = dataset
    data = ShardDataset(uri, "train", transform=build_eval_transform())
    assert len(data) == 7
    assert (data.num_classes, data.ignore_index, data.classes) == (4, IGNORE, CLASSES)
    items = [data[i] for i in range(len(data))]
    assert [item["sample_id"] for item in items] == [f"train-{i:04d}" for i in range(7)]
    for item in items:
        image, label = arrays[item["sample_id"]]
        assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
        np.testing.assert_allclose(item["image"].numpy(), eval_oracle(image), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(item["label"].numpy(), label)
    assert data[-1]["sample_id"] == "train-0006"
    with pytest.raises(IndexError):
        data[7]


def test_shard_dataset_without_transform_returns_decoded_uint8(dataset: tuple[str, Arrays]) -> None:
    uri, arrays = dataset
    item = ShardDataset(uri, "val")[1]
    image, label = arrays["val-0001"]
    assert item["image"].dtype == torch.uint8 and item["label"].dtype == torch.int64
    np.testing.assert_array_equal(item["image"].numpy().transpose(1, 2, 0), image)  # (3,H,W) -> (H,W,3)
    np.testing.assert_array_equal(item["label"].numpy(), label)


def test_shard_dataset_reads_no_shard_at_construction(dataset: tuple[str, Arrays]) -> None:
    uri, _ = dataset
    shard = open_manifest(uri).shards[1]
    (Path(uri) / shard.path).unlink()
    data = ShardDataset(uri, "train")
    assert len(data) == 7
    pickle.loads(pickle.dumps(data))
    assert data[0]["sample_id"] == "train-0000"  # the first shard is still there
    with pytest.raises((FileNotFoundError, OSError)):
        data[5]


def test_shard_dataset_unknown_split_and_verification(dataset: tuple[str, Arrays]) -> None:
    uri, _ = dataset
    with pytest.raises(ValueError, match="no split 'test'"):
        ShardDataset(uri, "test")
    sample_id = tamper_row(uri, 2, 0)
    data = ShardDataset(uri, "val")
    with pytest.raises(ValueError, match=sample_id):
        data[1]  # the whole shard is verified when it is first loaded


def test_shard_dataset_pickles_without_its_cache(dataset: tuple[str, Arrays]) -> None:
    uri, _ = dataset
    data = ShardDataset(uri, "train", cache_shards=1)
    data[0], data[5], data[6]
    assert len(data._cache) == 1
    clone = pickle.loads(pickle.dumps(data))
    assert len(clone._cache) == 0 and clone[3]["sample_id"] == "train-0003"


def test_shard_dataset_augmentation_is_deterministic_per_epoch(dataset: tuple[str, Arrays]) -> None:
    uri, _ = dataset
    transform = build_train_transform(16, scale_range=(0.75, 1.5))
    first = ShardDataset(uri, "train", transform=transform, seed=3)
    second = ShardDataset(uri, "train", transform=transform, seed=3)
    second[6], second[2]  # a different access order and cache state must not matter
    for i in range(len(first)):
        a, b = first[i], second[i]
        assert a["image"].shape == (3, 16, 16) and torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], b["label"])
    epoch0 = [first[i]["image"] for i in range(len(first))]
    first.set_epoch(1)
    epoch1 = [first[i]["image"] for i in range(len(first))]
    assert sum(not torch.equal(x, y) for x, y in zip(epoch0, epoch1, strict=True)) >= len(first) - 1
    first.set_epoch(0)
    assert all(torch.equal(first[i]["image"], epoch0[i]) for i in range(len(first)))
    other_seed = ShardDataset(uri, "train", transform=transform, seed=4)
    assert any(not torch.equal(other_seed[i]["image"], epoch0[i]) for i in range(len(first)))


def loader_batches(data: ShardDataset, workers: int) -> list[dict]:
    loader = DataLoader(data, batch_size=3, shuffle=False, num_workers=workers)
    return list(loader)


def test_shard_dataset_dataloader_workers_match_in_process(dataset: tuple[str, Arrays]) -> None:
    uri, _ = dataset
    data = ShardDataset(uri, "train", transform=build_train_transform(16), seed=1)
    data.set_epoch(2)
    data[0]  # a filled cache must not travel to (or confuse) the workers
    serial, parallel = loader_batches(data, 0), loader_batches(data, 2)
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel, strict=True):
        assert a["sample_id"] == b["sample_id"]
        assert a["image"].shape[1:] == (3, 16, 16)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert [sid for batch in serial for sid in batch["sample_id"]] == [f"train-{i:04d}" for i in range(7)]


# --- ray_dataset ---


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
            yield
        finally:
            ray.shutdown()


def ray_rows(dataset: object) -> dict[str, dict]:
    return {row["sample_id"]: row for row in dataset.take_all()}


def test_ray_dataset_matches_shard_dataset(dataset: tuple[str, Arrays], local_ray: None) -> None:
    uri, arrays = dataset
    # batch_size=7: one batch holds both image sizes (the ragged path).
    eval_rows = ray_rows(ray_dataset(uri, "train", transform=build_eval_transform(), batch_size=7))
    torch_items = {item["sample_id"]: item for item in ShardDataset(uri, "train", build_eval_transform())}
    assert sorted(eval_rows) == sorted(torch_items) == [f"train-{i:04d}" for i in range(7)]
    for sample_id, row in eval_rows.items():
        image, label = arrays[sample_id]
        assert row["image"].dtype == np.float32 and row["label"].dtype == np.int64
        np.testing.assert_array_equal(row["image"], torch_items[sample_id]["image"].numpy())
        np.testing.assert_allclose(row["image"], eval_oracle(image), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(row["label"], label)

    # Augmentation depends on (seed, epoch, sample_id) only: batching and the reader do not change it.
    transform = build_train_transform(16)
    train = ShardDataset(uri, "train", transform=transform, seed=5)
    train.set_epoch(1)
    expected = {item["sample_id"]: item for item in train}
    for batch_size in (2, 7):
        rows = ray_rows(
            ray_dataset(uri, "train", transform=transform, seed=5, epoch=1, batch_size=batch_size)
        )
        for sample_id, row in rows.items():
            assert row["image"].shape == (3, 16, 16)
            np.testing.assert_array_equal(row["image"], expected[sample_id]["image"].numpy())
            np.testing.assert_array_equal(row["label"], expected[sample_id]["label"].numpy())


def test_ray_dataset_batches(dataset: tuple[str, Arrays], local_ray: None) -> None:
    uri, _ = dataset
    batches = list(
        ray_dataset(uri, "val", transform=build_train_transform(16), batch_size=2).iter_batches(batch_size=3)
    )
    assert [batch["image"].shape for batch in batches] == [(3, 3, 16, 16)]
    assert batches[0]["label"].shape == (3, 16, 16) and batches[0]["image"].dtype == np.float32


def test_ray_dataset_raises_on_tampered_row(dataset: tuple[str, Arrays], local_ray: None) -> None:
    uri, _ = dataset
    sample_id = tamper_row(uri, 0, 1)
    with pytest.raises(Exception, match=rf"train-00000\.parquet: sample '{sample_id}' does not match"):
        ray_dataset(uri, "train", transform=build_eval_transform()).take_all()


def test_ray_is_not_imported_by_the_torch_path() -> None:
    code = "import sys, pipeline.data.readers; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
