"""Decided once, across processes: a training and a search resolve the tracking URI once, read the dataset's
manifest once and connect to Ray once, whatever their Ray Train workers and Tune trials do; a trial's spec is
its search's with the trial's overrides; configs are frozen."""

from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.train.spec import RunSpec

CALL_COUNTER = Path(__file__).parent / "callcount"  # its sitecustomize.py counts the calls in every process
ROOT = Path(__file__).parents[3]


def _counted_run(command: list[str], tmp_path: Path, name: str) -> tuple[collections.Counter, int]:
    """Runs ``ccnet <command>``; returns how often each counted function ran, over all processes, and how many
    processes counted something."""
    log = tmp_path / f"calls-{name}.txt"
    env = {
        **os.environ,
        "CCNET_CALL_LOG": str(log),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(CALL_COUNTER), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *command],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line.split() for line in log.read_text().splitlines()]
    return collections.Counter(name for name, _ in lines), len({pid for _, pid in lines})


def _settings(dataset: str, tmp_path: Path) -> list[str]:
    return [
        f"data.uri={dataset}",
        "data.crop_size=48",
        "data.batch_size=2",
        "data.loader_workers=1",
        "train.iterations=4",
        "train.log_every=2",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "eval.scales=[1.0]",
        f"run.storage={tmp_path / 'runs'}",
        "run.cpus_per_worker=0.9",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]


@pytest.mark.integration
def test_a_training_and_a_search_decide_once(generated_dataset, tmp_path: Path) -> None:
    dataset = generated_dataset(size=48, train=8, val=2)
    sets = [arg for setting in _settings(dataset, tmp_path) for arg in ("--set", setting)]
    # A training with Ray: the driver and one Ray Train worker (with a DataLoader process of its own).
    training, processes = _counted_run(["train", *sets, "--set", "run.name=once"], tmp_path, "train")
    assert training == {"resolve_tracking_uri": 1, "manifest_read": 1, "ray_connect": 1}
    assert processes == 1  # the worker decided nothing
    # A 2-trial ablation: the driver, two Tune trials, each with its Ray Train worker.
    search, processes = _counted_run(
        [
            "tune",
            "-c",
            "configs/ablation_ccnet-tiny_generated-256x256_cpu.yaml",
            *sets,
            "--set",
            "tune.name=once-search",
            "--set",
            "tune.seeds=[0]",
            "--set",
            "tune.max_concurrent=1",
            "--set",
            "tune.variants={fcn: [model.recurrence=0], cc_r2: [model.recurrence=2]}",
        ],
        tmp_path,
        "tune",
    )
    assert search == {"resolve_tracking_uri": 1, "manifest_read": 1, "ray_connect": 1}
    assert processes == 1


def test_a_config_is_frozen(generated_dataset) -> None:
    config = load_config(None, [f"data.uri={generated_dataset()}"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 0.1  # type: ignore[misc]
    changed = config.replace(train={"lr": 0.1})
    assert (changed.train.lr, config.train.lr) == (0.1, 0.01)
    assert changed.data == config.data


def test_a_trial_spec_is_its_search_with_the_trial_overrides(generated_dataset, tmp_path: Path) -> None:
    config = load_config(None, [f"data.uri={generated_dataset()}", f"run.storage={tmp_path}"])
    search = dataclasses.replace(RunSpec.of(config, tracking_uri="sqlite:///x.db"), name="search")
    trial = search.derive(["model.recurrence=0", "train.seed=3"], "search_fcn_seed3", "parent-id", "trial t")
    assert (trial.config.model.recurrence, trial.config.train.seed) == (0, 3)
    assert trial.config.run.name == trial.name == "search_fcn_seed3"
    assert trial.run_uri == str(tmp_path / "search_fcn_seed3")
    assert trial.manifest is search.manifest  # not read again
    assert (trial.tracking_uri, trial.parent_run_id) == ("sqlite:///x.db", "parent-id")
    assert "sqlite" not in repr(trial)  # a tracking URI may hold credentials
    other = search.derive(["train.seed=1"], "name: with a colon", None, "trial u")
    assert other.config.run.name == "name: with a colon"  # the name as it is, not parsed as YAML


def test_class_weights_are_counted_once_and_a_trial_keeps_its_searchs(
    generated_dataset, tmp_path: Path
) -> None:
    uri = generated_dataset()
    weighted = load_config(
        None, [f"data.uri={uri}", f"run.storage={tmp_path}", "train.class_weights=median_frequency"]
    )
    search = RunSpec.of(weighted)
    assert search.class_weights is not None and len(search.class_weights) == search.manifest.num_classes
    trial = search.derive(["model.recurrence=0"], "t", None, "trial t")
    assert trial.class_weights is search.class_weights  # the same data and option: not counted again
    assert search.derive(["train.class_weights=none"], "u", None, "trial u").class_weights is None
    plain = RunSpec.of(load_config(None, [f"data.uri={uri}", f"run.storage={tmp_path}"]))
    assert plain.class_weights is None
    turned_on = plain.derive(["train.class_weights=median_frequency"], "v", None, "trial v")
    assert turned_on.class_weights == search.class_weights


def test_a_train_split_without_a_labelled_pixel_is_refused_naming_the_key(
    generated_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from pipeline.config import ConfigError
    from pipeline.data.balance import ClassPixels
    from pipeline.train import spec as spec_module

    empty = ClassPixels(np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64))
    monkeypatch.setattr(spec_module, "class_pixels", lambda *_: empty)  # a split of void labels only
    config = load_config(
        None,
        [
            f"data.uri={generated_dataset()}",
            f"run.storage={tmp_path}",
            "train.class_weights=median_frequency",
        ],
    )
    with pytest.raises(
        ConfigError, match=r"^train\.class_weights=median_frequency: split 'train' of .*no labelled"
    ):
        RunSpec.of(config)
