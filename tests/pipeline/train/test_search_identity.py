"""A search continues only under the definition it started with: Tune restores the grid it started with and
ignores a new one, so a changed grid or setting is refused (naming each change), while where and how the
trials run may change. The whole command is checked in ``test_tune.py`` (a real ablation resumed)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipeline.config import load_config
from pipeline.data.readers import open_manifest
from pipeline.data.schema import Manifest
from pipeline.train.identity import IdentityError, check_continuation, run_identity, search_definition

SEARCH = [
    "tune.name=grid",
    "tune.scheduler=none",
    "tune.space={}",
    "tune.seeds=[0, 1]",
    "tune.variants={fcn: [model.recurrence=0], cc_r2: [model.recurrence=2]}",
    "tune.baseline=fcn",
    "train.iterations=4",
]

CHANGES = {  # a resumed search with ... : what the refusal names
    "a seed added": ("tune.seeds=[0, 1, 2]", "tune.seeds [0, 1] -> [0, 1, 2]"),
    "a variant redefined": (
        "tune.variants={fcn: [model.recurrence=0], cc_r2: [model.recurrence=3]}",
        "model.recurrence=3",
    ),
    "a variant added": (
        "tune.variants={fcn: [model.recurrence=0], cc_r2: [model.recurrence=2], cc_r1: [model.recurrence=1]}",
        "cc_r1",
    ),
    "a longer schedule": ("train.iterations=8", "train.iterations 4 -> 8"),
    "another learning rate": ("train.lr=0.02", "train.lr 0.01 -> 0.02"),
    "other test scales": ("eval.scales=[1.0]", "eval.scales"),
    "another crop": ("data.crop_size=32", "data.crop_size 256 -> 32"),
    "gamma from 1": ("model.gamma_init=1.0", "model.gamma_init"),
    "more workers": ("run.num_workers=2", "run.num_workers 1 -> 2"),
    "a searched key": ("tune.space={train.lr: {loguniform: [0.001, 0.1]}}", "tune.space {} -> "),
}

FREE = [  # how the trials run and are recorded: a resumed search may change these
    "tune.max_concurrent=2",
    "tune.baseline=cc_r2",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "data.loader_workers=2",
    "run.cpus_per_worker=0.5",
    "run.storage=elsewhere",
    "tracking.uri=sqlite:///other.db",
    "model.impl=autograd",
]


@pytest.fixture(scope="module")
def manifest(generated_dataset: Callable[..., str]) -> Manifest:
    return open_manifest(generated_dataset(size=32, train=2, val=1))


@pytest.mark.parametrize("case", CHANGES, ids=list(CHANGES))
def test_a_search_is_not_continued_under_another_definition(case: str, manifest: Manifest) -> None:
    change, named = CHANGES[case]
    saved = run_identity(load_config(None, SEARCH), manifest, search=True)
    changed = load_config(None, [*SEARCH, change])
    with pytest.raises(IdentityError) as refused:
        check_continuation(saved, changed, manifest, "search 'grid'", search=True)
    message = str(refused.value)
    assert message.startswith("search 'grid' was started as ccnet_tiny on generated/"), message
    assert named in message and "another tune.name" in message and "\n" not in message
    # Only what changed is named.
    assert message.count(" -> ") == 1, message


def test_how_a_search_runs_may_change(manifest: Manifest) -> None:
    saved = run_identity(load_config(None, SEARCH), manifest, search=True)
    check_continuation(saved, load_config(None, SEARCH), manifest, "search 'grid'", search=True)
    for change in FREE:
        check_continuation(
            saved, load_config(None, [*SEARCH, change]), manifest, "search 'grid'", search=True
        )


def test_the_definition_is_the_trials_settings_not_the_runs_place() -> None:
    definition = search_definition(load_config(None, SEARCH))
    assert definition["tune.seeds"] == [0, 1] and definition["train.iterations"] == 4
    assert definition["tune.variants"]["cc_r2"] == ["model.recurrence=2"]
    assert not {key for key in definition if key.startswith(("run.storage", "tracking.", "tune.name"))}
    assert "model.recurrence" not in definition  # the architecture: compared as a training's is
    assert "data.uri" not in definition  # the dataset: compared by its digest


def test_a_search_started_before_definitions_and_a_training_are_not_compared(manifest: Manifest) -> None:
    legacy = run_identity(load_config(None, SEARCH), manifest)  # no "search" entry
    check_continuation(
        legacy, load_config(None, [*SEARCH, "tune.seeds=[5]"]), manifest, "search 'grid'", search=True
    )
    # A training (run.name again) may still go on with another learning rate or schedule, as before.
    training = run_identity(load_config(None, ["run.name=first"]), manifest)
    check_continuation(
        training, load_config(None, ["train.lr=0.1", "train.iterations=9"]), manifest, "run 'first'"
    )
    with pytest.raises(IdentityError, match="another run.name"):
        check_continuation(training, load_config(None, ["model.recurrence=1"]), manifest, "run 'first'")
