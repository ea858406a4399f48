"""Misuse classes a careless user runs into, each tried through the real ``ccnet`` command with several cases:
a run continued on other data or under another model, a checkpoint run under another architecture, outputs
that would replace an input or a file the command did not create.

Every refusal: exit 2, one ERROR line naming both sides, no traceback, no MLflow run created or changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).parents[2]


def _ccnet(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _refused(result: subprocess.CompletedProcess, *named: str) -> str:
    """The one ERROR line of a refused command (exit 2, last on stderr, no traceback), naming ``named``."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines and lines[-1].startswith("ERROR"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("ERROR")] == lines[-1:], result.stderr[-2000:]
    for name in named:
        assert name in lines[-1], (name, lines[-1])
    return lines[-1]


def _runs(tracking: str) -> list[tuple[str, str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
    return sorted((run.info.run_id, run.info.run_name, run.info.status) for run in runs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A finished 2-iteration ccnet_tiny run on a generated dataset, and a second dataset (other images)
    and a third (other classes)."""
    tmp = tmp_path_factory.mktemp("misuse")
    uris = {}
    for name, seed in (("data", 0), ("other", 1), ("classes", 0)):
        counts = {"train": 4, "val": 2}
        source = build_source("generated", None, image_size=(32, 32), counts=counts, seed=seed)
        uris[name], _ = write_shards(source, str(tmp / name), workers=1, progress=False)
    manifest = Path(uris["classes"]) / "manifest.json"  # the same images, one class named otherwise
    manifest.write_text(manifest.read_text().replace('"object-cyan"', '"object-teal"'))
    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    settings = [
        f"data.uri={uris['data']}",
        "data.batch_size=2",
        "data.crop_size=32",
        "train.iterations=2",
        "train.log_every=1",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "eval.scales=[1.0]",
        "run.ray=false",
        f"run.storage={tmp / 'runs'}",
        f"tracking.uri={tracking}",
        "run.name=first",
        "model.name=ccnet_tiny",
    ]
    result = _ccnet("train", *(a for s in settings for a in ("--set", s)))
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = (tmp / "runs" / "first").rglob("best*/checkpoint.pt")
    return {**uris, "tracking": tracking, "checkpoint": str(checkpoint), "settings": "\n".join(settings)}


CONTINUATIONS = {  # the same run.name again, with ...
    "other data": ("data.uri={other}", ["data.uri", "other"]),
    "another attention": ("model.name=nonlocal_tiny", ["ccnet_tiny", "nonlocal_tiny"]),
    "another recurrence": ("model.recurrence=1", ["recurrence 2 -> 1"]),
    "another placement": ("model.placement=stem", ["placement"]),
}


@pytest.mark.parametrize("case", CONTINUATIONS, ids=list(CONTINUATIONS))
def test_a_run_is_not_continued_on_other_data_or_under_another_model(
    case: str, trained: dict[str, str]
) -> None:
    change, named = CONTINUATIONS[case]
    before = _runs(trained["tracking"])
    settings = [*trained["settings"].splitlines(), change.format(**trained), "train.iterations=4"]
    line = _refused(_ccnet("train", *(a for s in settings for a in ("--set", s))), "run 'first'", *named[:1])
    assert all(name.split("=")[0] in line or name in line for name in named), line
    assert _runs(trained["tracking"]) == before  # no run created, the finished one still FINISHED


CHECKPOINT_MISUSE = {  # ccnet evaluate / predict --checkpoint <a ccnet_tiny> with ...
    "evaluate under another attention": ("evaluate", "model.name=nonlocal_tiny", "nonlocal_tiny"),
    "evaluate under the axial variant": ("evaluate", "model.name=axial_tiny", "axial_tiny"),
    "evaluate with another recurrence": ("evaluate", "model.recurrence=3", "recurrence 2 -> 3"),
    "predict under another attention": ("predict", "model.name=nonlocal_tiny", "nonlocal_tiny"),
    "evaluate on other classes": ("evaluate", "data.uri={classes}", "other classes"),
}


@pytest.mark.parametrize("case", CHECKPOINT_MISUSE, ids=list(CHECKPOINT_MISUSE))
def test_a_checkpoint_runs_only_under_its_own_model(
    case: str, trained: dict[str, str], tmp_path: Path
) -> None:
    command, change, named = CHECKPOINT_MISUSE[case]
    before = _runs(trained["tracking"])
    args = ["--checkpoint", trained["checkpoint"], "--set", change.format(**trained)]
    if command == "predict":
        from PIL import Image

        Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
        args = [*args, str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
    _refused(_ccnet(command, *args), trained["checkpoint"], named)
    assert not (tmp_path / "out").exists()
    assert _runs(trained["tracking"]) == before


def test_the_same_run_and_checkpoint_still_go_on(trained: dict[str, str], tmp_path: Path) -> None:
    """The checks refuse changes only: continuing the run unchanged, and evaluating its checkpoint on its own
    dataset under its own model, work."""
    settings = [*trained["settings"].splitlines(), "model.impl=autograd"]  # how it computes, not what
    result = _ccnet(
        "evaluate",
        "--checkpoint",
        trained["checkpoint"],
        "--no-tracking",
        *(a for s in settings[-1:] for a in ("--set", s)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mIoU" in result.stdout


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_never_replaces_an_input_or_a_file_it_did_not_write(
    trained: dict[str, str], tmp_path: Path
) -> None:
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("a.png", (90, 90, 90)), ("a_mask.png", (200, 10, 10)), ("b.png", (10, 200, 10))):
        Image.new("RGB", (32, 32), colour).save(photos / name)
    (photos / "b_overlay.png").write_bytes(b"the user's own file")
    predict = ["predict", "--checkpoint", trained["checkpoint"]]
    cases = {  # inputs and --out: each would replace something the command reads or did not write
        "an input is an output": (
            [photos / "a.png", photos / "a_mask.png"],
            photos,
            "a_mask.png is also an input",
        ),
        "a file the user made": (
            [photos / "b.png"],
            photos,
            "b_overlay.png exists and was not written by ccnet",
        ),
        "an output is a link to an input": ([photos / "a.png"], photos / "links", "is also an input"),
    }
    (photos / "links").mkdir()
    (photos / "links" / "a_mask.png").symlink_to(photos / "a.png")
    before = _tree(photos)
    for case, (images, out, named) in cases.items():
        result = _ccnet(*predict, *map(str, images), "--out", str(out))
        _refused(result, "--out", named)
        assert _tree(photos) == before, case  # nothing written, nothing replaced

    out = tmp_path / "out"  # a folder of its own: written, and written again over its own outputs
    for _ in range(2):
        result = _ccnet(*predict, str(photos / "a.png"), str(photos / "b.png"), "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "a_mask.png",
        "a_overlay.png",
        "b_mask.png",
        "b_overlay.png",
    ]


def test_data_commands_never_write_into_what_they_read(trained: dict[str, str], tmp_path: Path) -> None:
    data = trained["data"]
    before = _tree(Path(data))
    (tmp_path / "notes.png").write_bytes(b"a user's file")
    cases = [
        (["data", "inspect", data, "--grid", f"{data}/grid.png"], "lies inside an input"),
        (["data", "inspect", data, "--grid", f"{data}/manifest.json"], "lies inside an input"),
        (["data", "inspect", data, "--grid", str(tmp_path / "notes.png")], "was not written by ccnet"),
        (["data", "inspect", data, "--grid", str(tmp_path)], "is a folder"),
        (
            ["data", "prepare", "--dataset", "camvid", "--root", str(tmp_path), "--out", str(tmp_path)],
            "overlap",
        ),
        (
            [
                "data",
                "prepare",
                "--dataset",
                "camvid",
                "--root",
                str(tmp_path / "camvid" / "v1"),
                "--out",
                str(tmp_path),
            ],
            "overlap",
        ),
    ]
    for args, named in cases:
        _refused(_ccnet(*args), named)
    assert _tree(Path(data)) == before and (tmp_path / "notes.png").read_bytes() == b"a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.png"]
    grid = tmp_path / "grid.png"
    for _ in range(2):  # its own grid it may replace
        assert _ccnet("data", "inspect", data, "--grid", str(grid)).returncode == 0
    assert grid.exists()


def test_a_run_never_writes_into_its_dataset(trained: dict[str, str]) -> None:
    data = trained["data"]
    before = _tree(Path(data))
    cases = [
        ([f"run.storage={data}"], "run.storage="),
        ([f"run.storage={data}/shards"], "run.storage="),
        ([f"run.storage={Path(data).parent}", f"run.name={Path(data).name}"], "run.storage="),
        ([f"tracking.uri=sqlite:///{data}/mlflow.db"], "tracking.uri="),
    ]
    for settings, named in cases:
        args = [a for s in [f"data.uri={data}", "run.ray=false", *settings] for a in ("--set", s)]
        _refused(_ccnet("train", *args), named, f"data.uri={data}")
    assert _tree(Path(data)) == before


def _broken_copies(data: str, tmp_path: Path) -> dict[str, str]:
    """Copies of a dataset version with one fault each, as a careless copy or a half-finished sync leaves."""
    import shutil

    copies = {}
    for fault in ("missing shard", "truncated shard", "changed shard"):
        version = tmp_path / fault.replace(" ", "-") / "generated" / "v1"
        shutil.copytree(data, version)
        shard = version / "shards" / "train-00000.parquet"
        content = shard.read_bytes()
        if fault == "missing shard":
            shard.unlink()
        elif fault == "truncated shard":
            shard.write_bytes(content[: len(content) // 2])
        else:  # same size, other bytes: found only when read, by a DataLoader worker
            shard.write_bytes(content[: len(content) // 2] + b"x" * (len(content) - len(content) // 2))
        copies[fault] = str(version)
    return copies


def test_mistakes_are_refused_before_tracking_and_ray_start(trained: dict[str, str], tmp_path: Path) -> None:
    """Data and model problems a run can see before it starts are refused before MLflow, Ray or the run's
    folder see anything; a mistaken re-run of a finished run leaves it FINISHED."""
    copies = _broken_copies(trained["data"], tmp_path)
    cases = {
        "missing shard": ([f"data.uri={copies['missing shard']}"], "train-00000.parquet of dataset"),
        "truncated shard": ([f"data.uri={copies['truncated shard']}"], "bytes, its manifest says"),
        "missing val split": (["data.val_split=test"], "data.val_split: dataset generated/v1 has no split"),
        "missing train split": (["data.train_split=training"], "data.train_split"),
        "missing weights": ([f"model.pretrained={tmp_path / 'weights.pt'}"], "weights.pt"),
    }
    settings = trained["settings"].splitlines()
    finished = Path(trained["checkpoint"]).parents[1]
    assert finished.name == "first"
    before, files = _runs(trained["tracking"]), _tree(finished)
    for case, (changes, named) in cases.items():
        new = [f"run.name=new-{case.replace(' ', '-')}", "run.ray=true", f"run.storage={tmp_path / 'runs'}"]
        for name, overrides in (("new", new), ("re-run", [])):  # a new run (with Ray); the finished run again
            ray_dir = tmp_path / "ray" / case.replace(" ", "-") / name
            args = [*settings, *changes, *overrides]
            result = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "train", *(a for s in args for a in ("--set", s))],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
                env={**os.environ, "RAY_TMPDIR": str(ray_dir), "RAY_USAGE_STATS_ENABLED": "0"},
            )
            _refused(result, named)
            assert not ray_dir.exists(), f"{case}: Ray started"
            assert not (tmp_path / "runs").exists(), f"{case}: something was written"
    assert _runs(trained["tracking"]) == before  # no run created; the finished one is still FINISHED
    assert _tree(finished) == files


def test_an_error_in_a_dataloader_worker_is_one_line(trained: dict[str, str], tmp_path: Path) -> None:
    changed = _broken_copies(trained["data"], tmp_path)["changed shard"]
    settings = [
        *trained["settings"].splitlines(),
        f"data.uri={changed}",
        "data.loader_workers=1",
        "run.name=changed",
        f"run.storage={tmp_path / 'runs'}",
    ]
    result = _ccnet("train", *(a for s in settings for a in ("--set", s)))
    line = _refused(result, "train-00000.parquet: sha256")
    assert "DataLoader worker" not in result.stderr and "Original Traceback" not in line
