"""The ablation table of finished searches, read back from their Tune state under ``run.storage``: one search
again, or several run as one study. A search continues only under the grid it started with, so seeds added
later run as a search of their own name; this gathers them, checking first that every search's trials ran
under the study's settings (its identity: the model, the dataset's content, the search's definition, each
variant as the config defines it), and that no variant and seed is there twice.

    ccnet ablation -c configs/ablation_lite0-d16_camvid-320x320_1000it-h10_cpu.yaml
    ccnet ablation -c <the same> --search <tune.name> --search <tune.name>-seeds3-4
    ccnet ablation -c <the same> --set tune.baseline=cc_r2   # every variant paired with CC R=2 instead
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, config_from_dict
from pipeline.data.readers import open_manifest
from pipeline.data.schema import Manifest
from pipeline.io import storage
from pipeline.io.redaction import redact
from pipeline.train import ablation
from pipeline.train.identity import (
    IDENTITY_FILE,
    IdentityError,
    architecture,
    read_identity,
    search_definition,
    study_differences,
)
from pipeline.train.spec import run_uri_of

log = logging.getLogger(__name__)

_LEGACY_CONFIG = "_config"  # the whole search config, in each trial's sampled values before the run spec


@dataclass(frozen=True)
class StudyReport:
    searches: dict[str, int]  # each search's trials
    trials: list[ablation.Trial]
    table: str  # the per-variant table (markdown), as a search prints it
    per_class: str  # each class's IoU per variant (markdown)


def _search_path(config: Config, name: str) -> tuple[Any, str]:
    """Tune's ``storage_filesystem`` (None for a local folder) and the search's folder, read only."""
    filesystem, root = storage.filesystem(config.run.storage)
    return (filesystem if storage.is_s3(config.run.storage) else None), f"{root.rstrip('/')}/{name}"


def search_trials(config: Config, name: str) -> tuple[list[ablation.Trial], Config | None]:
    """The trials of the ablation ``name`` under ``run.storage`` (each one's variant, seed, last reported
    metrics; a failed one with its error), and for a search older than the run spec the config its trials
    carried (None otherwise)."""
    from ray import tune  # lazy: Ray loads only for the commands that use it

    fs, path = _search_path(config, name)
    where = redact(run_uri_of(config.run.storage, name))
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise ValueError(f"no search {name!r} at {where} (run.storage={redact(config.run.storage)})")
    analysis = tune.ExperimentAnalysis(path, storage_filesystem=fs)
    trials, legacy = [], None
    for trial in analysis.trials:
        sampled = trial.config or {}
        if ablation.VARIANT not in sampled:
            raise ValueError(f"search {name!r} at {where} is not an ablation (its trials have no variant)")
        legacy = sampled.get(_LEGACY_CONFIG, legacy)
        error = f"Ray Tune status {trial.status}" if trial.status == "ERROR" else None
        metrics = {k: v for k, v in (trial.last_result or {}).items() if isinstance(v, int | float)}
        trials.append(
            ablation.Trial(sampled[ablation.VARIANT], int(sampled["train.seed"]), metrics, error=error)
        )
    return trials, None if legacy is None else config_from_dict(legacy, f"search {name!r}")


def gather(searches: Mapping[str, Sequence[ablation.Trial]]) -> list[ablation.Trial]:
    """The trials of every search as one study; a variant and seed in two searches is refused, naming both."""
    seen: dict[tuple[str, int], str] = {}
    trials = []
    for name, found in searches.items():
        for trial in found:
            key = (trial.variant, trial.seed)
            if key in seen:
                raise ValueError(
                    f"{trial.variant} seed {trial.seed} is in search {seen[key]!r} and in search {name!r}: "
                    "a study holds each variant and seed once"
                )
            seen[key] = name
            trials.append(trial)
    return trials


def check_search(
    name: str, saved: dict[str, Any] | None, legacy: Config | None, config: Config, manifest: Manifest
) -> None:
    """Refuses search ``name`` (its identity ``saved``; ``legacy``: the config an old search's trials
    carried) whose trials ran under other settings than ``config``'s study."""
    if saved is None:
        if legacy is None:
            raise ValueError(
                f"search {name!r} has no {IDENTITY_FILE} in run.storage: it is not a ccnet search"
            )
        log.warning("search %r is older than run identities: its dataset's content is not compared", name)
        saved = {
            "model": {"name": legacy.model.name, "architecture": architecture(legacy.model)},
            "dataset": None,
        }
    definition = saved.get("search") or (None if legacy is None else search_definition(legacy))
    changes = study_differences(saved, definition, config, manifest)
    if changes:
        raise IdentityError(
            f"search {name!r} ran under other settings than the config's study: {'; '.join(changes)}. "
            "Report it with its own config, or leave it out"
        )


def study_report(config: Config, names: Sequence[str] = ()) -> StudyReport:
    """The ablation table (with ``tune.baseline``'s paired differences) and the per-class table of the
    searches ``names`` (default: ``tune.name``), each checked against ``config`` first."""
    names = list(names) or [config.tune.name]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"search {twice[0]!r} is named twice")
    if not config.tune.variants:
        raise ValueError("tune.variants is empty: the config describes no ablation")
    manifest = open_manifest(config.data.uri)
    found = {}
    for name in names:
        trials, legacy = search_trials(config, name)
        check_search(name, read_identity(run_uri_of(config.run.storage, name)), legacy, config, manifest)
        found[name] = trials
    trials = gather(found)
    variants = ablation.variant_configs(config)
    costs = ablation.variant_costs(variants, manifest.num_classes, config.data.crop_size)
    baseline = config.tune.baseline
    rows = ablation.summarise(trials, costs, baseline)
    return StudyReport(
        {name: len(found[name]) for name in names},
        trials,
        ablation.results_table(rows, baseline),
        ablation.class_table(trials, list(costs), manifest.classes, baseline),
    )
