"""Searches gathered as one study (``ccnet ablation``): each variant and seed once, every search under the
study's settings, an old search checked through the config its trials carried. Reading a real search back
is checked in ``test_tune.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.readers import open_manifest
from pipeline.data.schema import Manifest
from pipeline.train import ablation
from pipeline.train.identity import IdentityError, run_identity
from pipeline.train.report import check_search, gather, study_report

STUDY = [
    "model.name=ccnet_tiny",
    "tune.name=grid",
    "tune.scheduler=none",
    "tune.space={}",
    "tune.seeds=[0, 1, 2]",
    "tune.variants={fcn: [model.recurrence=0], cc_r2: [model.recurrence=2], axial: [model.attention=axial]}",
    "tune.baseline=fcn",
]


def _trial(variant: str, seed: int) -> ablation.Trial:
    return ablation.Trial(variant, seed, {ablation.SINGLE: 0.5, ablation.MULTI: 0.6})


@pytest.fixture(scope="module")
def manifest(generated_dataset: Callable[..., str]) -> Manifest:
    return open_manifest(generated_dataset(size=32, train=2, val=1))


def test_searches_are_gathered_with_each_variant_and_seed_once() -> None:
    first = [_trial("fcn", 0), _trial("fcn", 1), _trial("cc_r2", 0), _trial("cc_r2", 1)]
    more = [_trial("fcn", 2), _trial("cc_r2", 2)]
    gathered = gather({"grid": first, "grid-more": more})
    assert sorted((t.variant, t.seed) for t in gathered) == sorted(
        (v, s) for v in ("fcn", "cc_r2") for s in (0, 1, 2)
    )
    rows = ablation.summarise(gathered, {"fcn": None, "cc_r2": None}, "fcn")  # type: ignore[dict-item]
    assert [(row.variant, row.seeds, row.delta_single.n) for row in rows[1:]] == [("cc_r2", (0, 1, 2), 3)]
    with pytest.raises(ValueError, match="cc_r2 seed 1 is in search 'grid' and in search 'again'"):
        gather({"grid": first, "again": [_trial("cc_r2", 1)]})


def test_a_search_of_the_study_with_other_seeds_or_fewer_variants_belongs(manifest: Manifest) -> None:
    study = load_config(None, STUDY)
    more = load_config(
        None,
        [
            *STUDY,
            "tune.name=grid-more",
            "tune.seeds=[3, 4]",
            "tune.variants={cc_r2: [model.recurrence=2]}",
            "tune.baseline=null",
        ],
    )
    check_search("grid-more", run_identity(more, manifest, search=True), None, study, manifest)


SETTINGS = {  # a search run with ... : what the refusal names
    "another learning rate": ("train.lr=0.02", "train.lr 0.02 -> 0.01"),
    "a variant defined otherwise": (
        "tune.variants={fcn: [model.recurrence=0], cc_r2: [model.recurrence=3]}",
        "tune.variants.cc_r2 ['model.recurrence=3'] -> ['model.recurrence=2']",
    ),
    "a variant the study lacks": (
        "tune.variants={fcn: [model.recurrence=0], nonlocal: [model.attention=nonlocal]}",
        "tune.variants.nonlocal (not in the config's variants)",
    ),
    "another model": ("model.name=axial_tiny", "model axial_tiny -> ccnet_tiny"),
}


@pytest.mark.parametrize("case", SETTINGS, ids=list(SETTINGS))
def test_a_search_under_other_settings_is_refused_naming_them(case: str, manifest: Manifest) -> None:
    change, named = SETTINGS[case]
    other = load_config(None, [*STUDY, change])
    with pytest.raises(IdentityError) as refused:
        check_search(
            "other", run_identity(other, manifest, search=True), None, load_config(None, STUDY), manifest
        )
    assert str(refused.value).startswith("search 'other' ran under other settings than the config's study: ")
    assert named in str(refused.value)


def test_an_old_search_is_checked_through_the_config_its_trials_carried(manifest: Manifest) -> None:
    study = load_config(None, STUDY)
    check_search("old", None, load_config(None, [*STUDY, "tune.seeds=[7]"]), study, manifest)
    with pytest.raises(IdentityError, match="train.iterations 9 -> 200"):
        check_search("old", None, load_config(None, [*STUDY, "train.iterations=9"]), study, manifest)
    with pytest.raises(ValueError, match="search 'x' has no run.identity in run.storage"):
        check_search("x", None, None, study, manifest)


def test_a_study_names_each_search_once_and_reads_only_searches(
    tmp_path: Path, generated_dataset: Callable[..., str]
) -> None:
    study = [*STUDY, f"data.uri={generated_dataset(size=32, train=2, val=1)}", f"run.storage={tmp_path}"]
    with pytest.raises(ValueError, match="search 'grid' is named twice"):
        study_report(load_config(None, study), ["grid", "grid"])
    with pytest.raises(ValueError, match=f"no search 'grid' at {tmp_path}/grid"):
        study_report(load_config(None, study))
    with pytest.raises(ValueError, match="tune.variants is empty"):
        study_report(load_config(None, [*study, "tune.variants={}", "tune.baseline=null"]))
