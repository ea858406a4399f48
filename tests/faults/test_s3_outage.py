"""The S3 server (a real SeaweedFS) stopped and started again in the middle of shard preparation and in the
middle of training's checkpoint uploads. A short outage is ridden out by retries; after a long one the run
fails with one line, publishes nothing, and a re-run completes. Afterwards every shard in the manifest is
there once, with the checksum the manifest records, and holds exactly the source's samples; every checkpoint
Ray registered loads whole.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards
from pipeline.io import storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COUNTS = {"train": 24, "val": 6}
IMAGE_SIZE = 64


def _prepare(out: str) -> subprocess.Popen:
    """``ccnet data prepare`` of a generated dataset cut into many small shards, in its own process."""
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "data",
        "prepare",
        "--dataset",
        "generated",
        "--out",
        out,
        "--count",
        ",".join(f"{split}={n}" for split, n in COUNTS.items()),
        "--image-size",
        str(IMAGE_SIZE),
        "--workers",
        "1",
        "--max-shard-mb",
        "0.02",
    ]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"},
    )


def _objects(uri: str) -> list[str]:
    try:
        return storage.list_files(uri)
    except (OSError, RuntimeError):
        return []


def _wait_for(predicate: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the run to get going"
        time.sleep(0.05)


def _check_version(version: str) -> None:
    """Every shard of the manifest exists once with its recorded sha256; together they hold exactly the
    source's samples, each once; nothing else lies among the shards."""
    from pipeline.data.readers import open_manifest

    manifest = open_manifest(version)
    files = storage.list_files(version)
    shard_files = sorted(name for name in files if name.endswith(".parquet"))
    assert shard_files == sorted(shard.path for shard in manifest.shards)  # none missing, none extra
    ids: dict[str, list[str]] = {split: [] for split in COUNTS}
    for shard in manifest.shards:
        data = storage.read_bytes(storage.join(version, shard.path))
        assert hashlib.sha256(data).hexdigest() == shard.sha256, shard.path
        table = pq.read_table(
            storage.filesystem(storage.join(version, shard.path))[1],
            filesystem=storage.filesystem(version)[0],
            columns=["sample_id"],
        )
        assert table.num_rows == shard.rows
        ids[shard.split] += table.column("sample_id").to_pylist()
    source = build_source("generated", None, image_size=(IMAGE_SIZE, IMAGE_SIZE), counts=COUNTS)
    for split, count in COUNTS.items():
        expected = sorted(ref.sample_id for ref in source.samples(split))
        assert len(expected) == count and sorted(ids[split]) == expected, split  # each sample exactly once


def test_short_outage_during_preparation_is_ridden_out(s3_env: str, seaweedfs: Any) -> None:
    storage.ensure_bucket(s3_env)
    out = storage.join(s3_env, "datasets")
    shards = storage.join(out, "generated", "v1", "shards")
    process = _prepare(out)
    try:
        _wait_for(lambda: len(_objects(shards)) >= 2 or process.poll() is not None)
        assert process.poll() is None, "preparation ended before the outage: make it longer"
        seaweedfs.stop()
        time.sleep(2.0)
    finally:
        seaweedfs.start()
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "WARNING retry 1/" in stderr, "the outage did not hit the writer"
    _check_version(storage.join(out, "generated", "v1"))


def test_long_outage_during_preparation_fails_cleanly_and_a_rerun_completes(
    s3_env: str, seaweedfs: Any
) -> None:
    storage.ensure_bucket(s3_env)
    out = storage.join(s3_env, "datasets")
    version = storage.join(out, "generated", "v1")
    process = _prepare(out)
    try:
        _wait_for(lambda: len(_objects(storage.join(version, "shards"))) >= 2 or process.poll() is not None)
        assert process.poll() is None, "preparation ended before the outage: make it longer"
        seaweedfs.stop()
        _, stderr = process.communicate(timeout=300)  # the server stays down until the writer gives up
    finally:
        seaweedfs.start()
    assert process.returncode == 2 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR ") and f"{out}/generated/v1/" in last, last  # names what it was writing
    assert not storage.exists(storage.join(version, "manifest.json"))  # nothing published
    rerun = _prepare(out)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    _check_version(version)


def test_outage_during_checkpoint_uploads(s3_env: str, seaweedfs: Any, tmp_path: Path) -> None:
    """Training on local data with its checkpoints on S3; the server goes away just as the first checkpoint
    has landed and comes back 3 s later, while later ones are being written."""
    import ray

    from pipeline.config import load_config
    from pipeline.io.checkpoints import CHECKPOINT_FILE, load
    from pipeline.train.ray_train import fit
    from pipeline.train.spec import RunSpec

    source = build_source("generated", None, image_size=(48, 48), counts={"train": 16, "val": 2})
    data, _ = write_shards(source, str(tmp_path / "data"), workers=1, progress=False)
    runs = storage.join(s3_env, "runs")
    config = load_config(
        None,
        [
            f"data.uri={data}",
            "data.crop_size=48",
            "data.batch_size=2",
            "train.iterations=16",
            "train.checkpoint_every=2",
            "train.eval_every=4",
            "train.log_every=4",
            "eval.scales=[1.0]",
            f"run.storage={runs}",
            "run.name=outage",
            "run.num_workers=1",
            "run.cpus_per_worker=1",
            "run.max_failures=2",
            "train.keep_checkpoints=10",
        ],
    ).with_absolute_paths()
    errors: list[BaseException] = []

    def outage() -> None:
        try:
            run = storage.join(runs, "outage")
            _wait_for(lambda: any(name.endswith(CHECKPOINT_FILE) for name in _objects(run)))
            seaweedfs.stop()
            time.sleep(3.0)
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            seaweedfs.start()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False)  # after s3_env: the workers inherit the AWS_* settings
    thread = threading.Thread(target=outage)
    try:
        thread.start()
        result = fit(RunSpec.of(config), None)
    finally:
        thread.join()
        ray.shutdown()
    assert errors == []
    with result.checkpoint.as_directory() as folder:
        assert load(str(Path(folder) / CHECKPOINT_FILE))["iteration"] == 16
    iterations = set()
    for checkpoint, _ in result.best_checkpoints:
        with checkpoint.as_directory() as folder:
            iterations.add(load(str(Path(folder) / CHECKPOINT_FILE))["iteration"])
    assert iterations == set(range(2, 17, 2))  # every planned checkpoint is there and loads whole
    assert load(storage.join(runs, "outage", "best", CHECKPOINT_FILE))["iteration"] in {4, 8, 12, 16}
