"""Bad input is refused clearly: a corpus of broken datasets, shards, configs, storage locations, checkpoints
and S3 settings.

Every case runs the real ``ccnet`` command in a subprocess and checks what a user sees: a non-zero exit, no
traceback (unless ``--debug``), one ``ERROR ...`` line, last on stderr, naming the file, key or value at
fault, and nothing half-written where the command would have written its result (no manifest, shard or
temporary file of a dataset version, no checkpoint, no MLflow run left RUNNING, no sample grid). Input that
is unusual but valid (a relative path, a 16-bit PNG) is read the way the user meant, and says so.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.config.model import build_model
from pipeline.io.checkpoints import save_file

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).parents[2]
SIZE = 16  # CamVid fixture images are SIZE x SIZE
# The storage module backs off up to ~15 s between retries against a dead endpoint; this runs the same
# command with the waits skipped (every attempt still happens), as tests/pipeline/io/test_storage.py does.
NO_RETRY_WAIT = (
    "import sys; import pipeline.io.retry as retries; from pipeline.cli.main import main; "
    "retries._sleep = lambda s: None; sys.exit(main())"
)


def _env(**extra: str) -> dict[str, str]:
    """This environment without AWS_* / MLFLOW_* settings (unless given), Ray and MLflow telemetry off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    return env | {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"} | extra


def _ccnet(
    *args: str, env: dict[str, str] | None = None, code: str | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline.cli ARGS`` (or ``python -c CODE ARGS``) from ``cwd`` (the repository root)."""
    entry = ["-c", code] if code else ["-m", "pipeline.cli"]
    env = env or _env()
    if cwd != ROOT:  # the code of this tree, wherever the command runs from
        env = env | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, *entry, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _refused(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Assert a clear refusal and return its error line: exit 2, no traceback, one ``ERROR`` line, last on
    stderr, holding every ``expected`` substring."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("ERROR")]
    assert errors == lines[-1:], result.stderr  # one error line, and it comes last
    for text in expected:
        assert text in lines[-1]
    return lines[-1]


def _files(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden temporary files included; [] when it does not exist."""
    if not folder.exists():
        return []
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------- raw datasets


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _camvid(root: Path) -> Path:
    """A tiny CamVid copy in the SegNet layout (``<split>/`` frames, ``<split>annot/`` labels), 2 a split."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for folder in (split, f"{split}annot"):
            (root / folder).mkdir(parents=True)
        for index in range(2):
            stem = f"{split}_{index:03d}"
            # Noise: the PNG is large enough that cutting it in half truncates the pixel data.
            (root / split / f"{stem}.png").write_bytes(_png(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)))
            (root / f"{split}annot" / f"{stem}.png").write_bytes(_png(np.full((SIZE, SIZE), 3, np.uint8)))
    return root


def _corrupt_image(root: Path) -> None:
    (root / "train/train_001.png").write_bytes(b"\x89PNG but not really " * 8)


def _truncate_image(root: Path) -> None:
    path = root / "train/train_001.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _label_outside_mapping(root: Path) -> None:
    (root / "trainannot/train_001.png").write_bytes(_png(np.full((SIZE, SIZE), 200, np.uint8)))


def _label_of_another_size(root: Path) -> None:
    (root / "trainannot/train_001.png").write_bytes(_png(np.full((SIZE // 2, SIZE), 3, np.uint8)))


def _remove_label(root: Path) -> None:
    (root / "trainannot/train_001.png").unlink()


def _empty_dataset_folder(root: Path) -> None:
    shutil.rmtree(root)
    root.mkdir()


def _empty_split_folders(root: Path) -> None:
    for path in root.glob("*/*.png"):
        path.unlink()


IMAGE, LABEL = "{root}/train/train_001.png", "{root}/trainannot/train_001.png"
RAW_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # case: (how the fixture is broken, the expected error; {root} is the dataset root)
    "corrupt image": (_corrupt_image, IMAGE + ": unreadable image (not a format PIL can decode)"),
    "truncated image": (_truncate_image, IMAGE + ": unreadable image (image file is truncated)"),
    "label ids outside the mapping": (
        _label_outside_mapping,
        LABEL + ": label values [200] are outside the camvid id mapping",
    ),
    "image/label size mismatch": (
        _label_of_another_size,
        LABEL + ": label is 16x8 but image train/train_001.png is 16x16",
    ),
    "missing label file": (_remove_label, LABEL + ": label file is missing"),
    "empty dataset folder": (_empty_dataset_folder, "{root}/train: split folder is missing"),
    "empty split folders": (
        _empty_split_folders,
        "{root}: no camvid samples found in splits ['train', 'val']",
    ),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_bad_raw_dataset_is_refused_and_nothing_is_written(case: str, tmp_path: Path) -> None:
    """``ccnet data prepare`` stops at the first bad file, names it, and leaves the version empty."""
    breaks, expected = RAW_CASES[case]
    root = _camvid(tmp_path / "camvid")
    breaks(root)
    out = tmp_path / "datasets"
    result = _ccnet(
        "data", "prepare", "--dataset", "camvid", "--root", str(root), "--out", str(out), "--workers", "1"
    )
    _refused(result, expected.format(root=root))
    assert _files(out) == []


def test_bad_sample_in_a_later_shard_publishes_nothing(tmp_path: Path) -> None:
    """Shards finished before the bad one stay whole (a re-run resumes from them), but no manifest is
    published, and a reader refuses the unfinished version."""
    root = _camvid(tmp_path / "camvid")
    (root / "valannot/val_001.png").write_bytes(_png(np.full((SIZE, SIZE), 77, np.uint8)))
    out = tmp_path / "datasets"
    result = _ccnet(
        "data", "prepare", "--dataset", "camvid", "--root", str(root), "--out", str(out), "--workers", "1"
    )
    _refused(result, f"{root}/valannot/val_001.png: label values [77] are outside the camvid id mapping")
    version = out / "camvid" / "v1"
    assert _files(version) == ["_receipts/train-00000.json", "shards/train-00000.parquet"]
    pq.read_table(version / "shards/train-00000.parquet")  # whole, not a partial file
    _refused(_ccnet("data", "inspect", str(version)), f"{version}: no manifest.json")


def test_generated_count_of_zero_is_refused(tmp_path: Path) -> None:
    result = _ccnet(
        "data",
        "prepare",
        "--dataset",
        "generated",
        "--out",
        str(tmp_path),
        "--count",
        "train=0,val=2",
        "--workers",
        "1",
    )
    line = _refused(result, "--count", "counts must be positive, got 'train=0,val=2'")
    assert line.startswith("ERROR ccnet data prepare: argument --count")
    assert _files(tmp_path) == []


# ------------------------------------------------------------------------------------ shards and manifests


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared generated dataset version (train 4, val 2, one shard each), never modified."""
    out = tmp_path_factory.mktemp("prepared")
    assert (
        main(
            [
                "data",
                "prepare",
                "--dataset",
                "generated",
                "--out",
                str(out),
                "--count",
                "train=4,val=2",
                "--image-size",
                "32",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    return out / "generated" / "v1"


def _edit_manifest(version: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((version / "manifest.json").read_text())
    edit(manifest)
    (version / "manifest.json").write_text(json.dumps(manifest))


def _record_shard(version: Path) -> None:
    """Make the manifest agree with the train shard's current bytes (a consistent but bad version)."""
    data = (version / "shards/train-00000.parquet").read_bytes()

    def edit(manifest: dict) -> None:
        manifest["shards"][0].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))

    _edit_manifest(version, edit)


def _remove_manifest(version: Path) -> None:
    (version / "manifest.json").unlink()


def _garble_manifest(version: Path) -> None:
    (version / "manifest.json").write_text('{"dataset": "generated",')


def _wrong_checksum(version: Path) -> None:
    _edit_manifest(version, lambda manifest: manifest["shards"][0].update(sha256="0" * 64))


def _truncate_shard(version: Path) -> None:
    path = version / "shards/train-00000.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_shard_recorded(version: Path) -> None:
    _truncate_shard(version)
    _record_shard(version)


def _foreign_shard(version: Path) -> None:
    foreign = pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]})
    pq.write_table(foreign, version / "shards/train-00000.parquet")
    _record_shard(version)


def _corrupt_row(version: Path) -> None:
    path = version / "shards/train-00000.parquet"
    table = pq.read_table(path)
    index = table.schema.get_field_index("image")
    images = table.column("image").to_pylist()
    images[1] = images[0]  # a valid image, but not the one the row's checksum covers
    pq.write_table(table.set_column(index, table.schema.field(index), pa.array(images, pa.binary())), path)
    _record_shard(version)


def _escaping_shard_path(version: Path) -> None:
    _edit_manifest(version, lambda manifest: manifest["shards"][0].update(path="../../x.parquet"))


SHARD = "{version}/shards/train-00000.parquet"
SHARD_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # case: (how the copy is broken, the expected error; {version} is the copy, {sha} its train shard's hash)
    "version without manifest": (
        _remove_manifest,
        "{version}: no manifest.json (dataset not prepared, or preparation did not finish)",
    ),
    "manifest not JSON": (_garble_manifest, "{version}/manifest.json: not valid JSON"),
    "manifest checksum does not match": (
        _wrong_checksum,
        SHARD + ": sha256 {sha} does not match the manifest's 000",
    ),
    "truncated shard, manifest updated": (_truncate_shard_recorded, SHARD + ": not a readable Parquet file"),
    "foreign Parquet shard": (
        _foreign_shard,
        SHARD + ": not a shard of this format; missing columns ['sample_id', 'split',",
    ),
    "row checksum does not match": (
        _corrupt_row,
        SHARD + ": sample 'train-000001' does not match its checksum (corrupted row)",
    ),
    "shard path escapes the prefix": (
        _escaping_shard_path,
        "{version}/manifest.json: shard path '../../x.parquet' escapes the dataset prefix",
    ),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_bad_dataset_version_is_refused(case: str, dataset: Path, tmp_path: Path) -> None:
    """``ccnet data inspect`` verifies the manifest and every shard; its sample grid is not written."""
    breaks, expected = SHARD_CASES[case]
    version = tmp_path / "generated" / "v1"
    shutil.copytree(dataset, version)
    breaks(version)
    shard = version / "shards/train-00000.parquet"
    sha = hashlib.sha256(shard.read_bytes()).hexdigest() if shard.exists() else ""
    grid = tmp_path / "grid.png"
    result = _ccnet("data", "inspect", str(version), "--grid", str(grid))
    _refused(result, expected.format(version=version, sha=sha))
    assert not grid.exists()


def test_training_on_a_bad_shard_leaves_no_checkpoint_and_no_running_run(
    dataset: Path, tmp_path: Path
) -> None:
    """``ccnet train`` stops at the shard, writes no checkpoint and marks its MLflow run FAILED."""
    version = tmp_path / "generated" / "v1"
    shutil.copytree(dataset, version)
    _truncate_shard_recorded(version)
    runs, db = tmp_path / "runs", tmp_path / "mlflow.db"
    settings = [
        f"data.uri={version}",
        f"run.storage={runs}",
        "run.ray=false",
        f"tracking.uri=sqlite:///{db}",
        "train.iterations=2",
        "data.crop_size=32",
        "data.batch_size=2",
        "model.recurrence=1",
    ]
    result = _ccnet("train", *[arg for setting in settings for arg in ("--set", setting)])
    _refused(result, f"{version}/shards/train-00000.parquet: not a readable Parquet file")
    assert [name for name in _files(runs) if name.endswith(".pt")] == []
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT status FROM runs").fetchall() == [("FAILED",)]


# ------------------------------------------------------------------------------------------------- configs


CONFIG_CASES: dict[str, tuple[str, list[str], str]] = {
    # case: (YAML text, --set overrides, expected text; {path} is the config file)
    "unknown key": ("train:\n  lrr: 0.1\n", [], "{path}: unknown key train.lrr (valid: ["),
    "wrong type": ("train:\n  iterations: many\n", [], "{path}: train.iterations must be int, got 'many'"),
    "wrong type in --set": ("{}\n", ["data.batch_size=[8]"], "{path}: data.batch_size must be int, got [8]"),
    "negative lr": ("train:\n  lr: -0.01\n", [], "{path}: train.lr=-0.01 is not allowed"),
    "R < 0": ("model:\n  recurrence: -1\n", [], "{path}: model.recurrence=-1 is not allowed"),
    # Train crops and slide windows pad the image up to the crop, so a crop cannot exceed the padded image;
    # what can be impossible is a window stride longer than the window (pixels left uncovered).
    "eval stride larger than the crop": (
        "eval:\n  mode: slide\n  crop_size: 64\n  stride: 96\n",
        [],
        "{path}: eval.stride=96 is not allowed",
    ),
    "run name escaping run.storage": (
        "run:\n  name: ../elsewhere\n",
        [],
        "{path}: run.name='../elsewhere' is not allowed",
    ),
    "invalid YAML": ("train: [lr: 0.1\n", [], "{path}: invalid YAML ("),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_refused_before_anything_starts(case: str, tmp_path: Path) -> None:
    text, overrides, expected = CONFIG_CASES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    runs, db = tmp_path / "runs", tmp_path / "mlflow.db"
    settings = [*overrides, f"run.storage={runs}", f"tracking.uri=sqlite:///{db}", "run.ray=false"]
    result = _ccnet("train", "-c", str(path), *[arg for setting in settings for arg in ("--set", setting)])
    _refused(result, expected.format(path=path))
    assert not runs.exists() and not db.exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: -0.01\n")
    result = _ccnet("--debug", "train", "-c", str(path))
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert f"pipeline.config.schema.ConfigError: {path}: train.lr=-0.01 is not allowed" in result.stderr


# --------------------------------------------------------------------------------------- storage locations


LOCATION_CASES: dict[str, tuple[str, str, str]] = {
    # case: (config key, value, expected text); each was once taken as a local folder of that name
    "s3 without a bucket": ("run.storage", "s3://", "run.storage='s3://' has no bucket"),
    "s3 key without a bucket": (
        "data.uri",
        "s3:///datasets/generated/v1",
        "data.uri='s3:///datasets/generated/v1' has no bucket",
    ),
    "gs scheme": (
        "data.uri",
        "gs://bucket/datasets/v1",
        "data.uri='gs://bucket/datasets/v1' has an "
        "unsupported scheme 'gs'; use s3://bucket[/prefix], a local path or file:///absolute/path",
    ),
    "hdfs scheme": (
        "run.storage",
        "hdfs://namenode/runs",
        "run.storage='hdfs://namenode/runs' has an unsupported",
    ),
    "s4 typo": ("run.storage", "s4://bucket/runs", "run.storage='s4://bucket/runs' has an unsupported"),
    "s3 with one slash": ("run.storage", "s3:/bucket/runs", "run.storage='s3:/bucket/runs' is not a URI"),
    "file URI naming a host": (
        "run.storage",
        "file://runs/checkpoints",
        "run.storage='file://runs/checkpoints' names host 'runs': "
        "write file:///absolute/path, or a plain path",
    ),
    "endpoint in the bucket's place": (
        "data.uri",
        "s3://127.0.0.1:8333/datasets",
        "data.uri='s3://127.0.0.1:8333/datasets' has a port in the bucket's place: the endpoint belongs in "
        "AWS_ENDPOINT_URL",
    ),
    "URI inside a path": ("run.storage", "runs/s3://bucket", "run.storage='runs/s3://bucket' holds '://'"),
}


@pytest.mark.parametrize("case", list(LOCATION_CASES))
def test_bad_location_in_config_is_refused_before_anything_is_written(case: str, tmp_path: Path) -> None:
    """``ccnet train`` refuses the key before tracking or storage are touched: the folder it runs in stays
    empty (no ``s3:`` folder, no MLflow store)."""
    key, value, expected = LOCATION_CASES[case]
    settings = {
        "data.uri": str(tmp_path / "no-dataset"),
        "run.storage": "runs",
        "run.ray": "false",
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "train.iterations": "2",
        key: value,
    }
    args = [arg for name, setting in settings.items() for arg in ("--set", f"{name}={setting}")]
    result = _ccnet("train", *args, cwd=tmp_path)
    _refused(result, f"ERROR defaults: {expected}")
    assert _files(tmp_path) == []


PREPARE = [
    "data",
    "prepare",
    "--dataset",
    "generated",
    "--count",
    "train=1,val=1",
    "--image-size",
    "32",
    "--workers",
    "1",
]
FLAG_CASES: dict[str, tuple[list[str], str]] = {
    # case: (command line, expected text)
    "prepare --out s3 without a bucket": (
        [*PREPARE, "--out", "s3://"],
        "ERROR ccnet data prepare: argument --out: 's3://' has no bucket",
    ),
    "prepare --out gs": (
        [*PREPARE, "--out", "gs://bucket/datasets"],
        "argument --out: 'gs://bucket/datasets' has an unsupported scheme 'gs'",
    ),
    "prepare --out file URI naming a host": (
        [*PREPARE, "--out", "file://datasets"],
        "argument --out: 'file://datasets' names host 'datasets'",
    ),
    "inspect hdfs": (
        ["data", "inspect", "hdfs://namenode/datasets/v1"],
        "ERROR ccnet data inspect: argument uri: 'hdfs://namenode/datasets/v1' has an unsupported scheme",
    ),
    "evaluate --checkpoint s3 without a bucket": (
        ["evaluate", "--checkpoint", "s3:///runs/quickstart/best/checkpoint.pt"],
        "argument --checkpoint: 's3:///runs/quickstart/best/checkpoint.pt' has no bucket",
    ),
    "predict --out on s3": (
        ["predict", "street.png", "--checkpoint", "checkpoint.pt", "--out", "s3://bucket/predictions"],
        "argument --out: 's3://bucket/predictions' is on S3: this command writes to a local folder",
    ),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_location_flag_is_refused_before_anything_is_written(case: str, tmp_path: Path) -> None:
    args, expected = FLAG_CASES[case]
    _refused(_ccnet(*args, cwd=tmp_path), expected)
    assert _files(tmp_path) == []


def test_relative_locations_are_resolved_and_shown_once(tmp_path: Path) -> None:
    """A relative ``--out``, ``data.uri`` and ``run.storage`` become absolute paths under the working folder,
    each announced by one INFO line; messages then name the absolute path."""
    result = _ccnet(*PREPARE, "--out", "datasets", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("--out: ") == 1
    assert f"INFO --out: datasets resolved to {tmp_path / 'datasets'}\n" in result.stderr
    assert result.stdout.startswith(f"{tmp_path / 'datasets/generated/v1'}: train 1, val 1 samples")

    settings = [
        "data.uri=missing/v1",
        "run.storage=runs",
        "run.ray=false",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    result = _ccnet("train", *[arg for setting in settings for arg in ("--set", setting)], cwd=tmp_path)
    _refused(result, f"{tmp_path / 'missing/v1'}: no manifest.json")
    for key, value in (("data.uri", "missing/v1"), ("run.storage", "runs")):
        assert result.stderr.count(f"{key}: ") == 1
        assert f"INFO {key}: {value} resolved to {tmp_path / value}\n" in result.stderr


def test_file_uri_is_the_local_path(tmp_path: Path) -> None:
    """``file:///abs`` is the plain path ``/abs`` everywhere: prepared there, inspected from there."""
    out = tmp_path / "a folder"
    result = _ccnet(*PREPARE, "--out", out.as_uri())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{out / 'generated/v1'}: train 1, val 1 samples")
    assert (out / "generated/v1/manifest.json").is_file()
    result = _ccnet("data", "inspect", (out / "generated/v1").as_uri())
    assert result.returncode == 0 and "samples: train 1, val 1" in result.stdout, result.stderr


# --------------------------------------------------------------------------------------------- checkpoints


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: code that a weights-only load must not run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable, tuple[str, str]]:
        return open, (str(self.marker), "w")


def _checkpoint(folder: Path, dataset: Path, weights: list[str], config: list[str], num_classes: int) -> Path:
    """A checkpoint of a model built with ``weights`` overrides, whose saved config has ``config``."""
    model = build_model(load_config(None, weights), num_classes)
    saved = load_config(None, [f"data.uri={dataset}", "run.ray=false", *config]).to_dict()
    state = {
        "model": model.state_dict(),
        "iteration": 4,
        "num_classes": num_classes,
        "config": saved,
        "model_name": "ccnet_tiny",
    }
    return save_file(folder, state)


def test_checkpoint_of_another_architecture_is_refused(dataset: Path, tmp_path: Path) -> None:
    """Weights of the R=0 network (no attention) loaded into the R=2 one its config asks for."""
    path = _checkpoint(tmp_path, dataset, ["model.recurrence=0"], ["model.recurrence=2"], num_classes=6)
    result = _ccnet("evaluate", "--checkpoint", str(path), "--no-tracking")
    _refused(result, f"{path}: checkpoint does not fit this model: ", "missing keys ['head.attention.")


def test_checkpoint_for_another_number_of_classes_is_refused(dataset: Path, tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, dataset, [], [], num_classes=19)
    result = _ccnet("evaluate", "--checkpoint", str(path), "--no-tracking")
    _refused(
        result,
        f"{path}: checkpoint does not fit this model: size mismatch for head.classifier.weight",
        "torch.Size([19, ",
        "torch.Size([6, ",
    )


def test_checkpoint_of_random_bytes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    result = _ccnet("evaluate", "--checkpoint", str(path), "--no-tracking")
    _refused(result, f"{path}: not a loadable checkpoint (UnpicklingError)")


def test_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": _Payload(marker), "iteration": 1}, path)
    result = _ccnet("predict", str(path), "--checkpoint", str(path), "--out", str(tmp_path / "predictions"))
    _refused(result, f"{path}: not a loadable checkpoint (UnpicklingError)")
    assert not marker.exists() and not (tmp_path / "predictions").exists()
    torch.load(path, weights_only=False)  # the oracle: a full unpickle does run the payload
    assert marker.exists()


def _array(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_predict_reads_a_16_bit_png_as_its_8_bit_twin(dataset: Path, tmp_path: Path) -> None:
    """``ccnet predict`` sees in a 16-bit gray PNG the picture of its 8-bit copy (it used to clip it to white,
    exit 0): the two give the same mask and the same overlay."""
    checkpoint = _checkpoint(tmp_path, dataset, [], [], num_classes=6)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2 * SIZE, 2 * SIZE), np.uint8)
    Image.fromarray(gray).save(tmp_path / "eight.png")
    # The 8-bit picture in the high bytes, noise in the low ones.
    Image.fromarray(gray.astype(np.uint16) * 256 + rng.integers(0, 256, gray.shape, np.uint16)).save(
        tmp_path / "sixteen.png"
    )
    with Image.open(tmp_path / "sixteen.png") as image:
        assert image.mode == "I;16"
    out = tmp_path / "predictions"
    result = _ccnet(
        "predict",
        str(tmp_path / "eight.png"),
        str(tmp_path / "sixteen.png"),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    for suffix in ("mask", "overlay"):
        sixteen, eight = (_array(out / f"{stem}_{suffix}.png") for stem in ("sixteen", "eight"))
        np.testing.assert_array_equal(sixteen, eight)


# ---------------------------------------------------------------------------------------------- S3 settings


@pytest.mark.integration
def test_unreachable_endpoint_is_refused_naming_it() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on: bound, never listening, then closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = _env(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="fake-key-id", AWS_SECRET_ACCESS_KEY="fake-secret-key"
    )
    result = _ccnet("data", "inspect", "s3://bucket/datasets/generated/v1", env=env, code=NO_RETRY_WAIT)
    line = _refused(
        result,
        "gave up after 11 attempts: check s3://bucket/datasets/generated/v1/manifest.json",
        "Could not connect",
        f"[endpoint {endpoint}]",
    )
    assert "fake-secret-key" not in result.stderr and "fake-key-id" not in line


@pytest.mark.integration
def test_wrong_credentials_are_refused_naming_the_location(seaweedfs: Any) -> None:
    env = _env(
        AWS_ENDPOINT_URL=seaweedfs.endpoint,
        AWS_ACCESS_KEY_ID=seaweedfs.access_key,
        AWS_SECRET_ACCESS_KEY="not-the-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
    )
    result = _ccnet("data", "inspect", "s3://bucket/datasets/generated/v1", env=env)
    line = _refused(
        result,
        "credentials rejected for s3://bucket/datasets/generated/v1/manifest.json",
        "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    )
    assert "not-the-secret-key" not in result.stderr and seaweedfs.access_key not in line


@pytest.mark.integration
def test_wrong_credentials_write_nothing(seaweedfs: Any) -> None:
    import secrets

    import boto3

    bucket = f"bad-inputs-{secrets.token_hex(4)}"
    env = _env(
        AWS_ENDPOINT_URL=seaweedfs.endpoint,
        AWS_ACCESS_KEY_ID=seaweedfs.access_key,
        AWS_SECRET_ACCESS_KEY="not-the-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
    )
    result = _ccnet(
        "data",
        "prepare",
        "--dataset",
        "generated",
        "--out",
        f"s3://{bucket}/datasets",
        "--count",
        "train=2,val=1",
        "--image-size",
        "32",
        "--workers",
        "1",
        env=env,
    )
    _refused(result, f"credentials rejected for s3://{bucket}")
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=seaweedfs.endpoint,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
        region_name="us-east-1",
    )
    assert bucket not in {item["Name"] for item in client.list_buckets()["Buckets"]}
