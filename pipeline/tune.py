"""Hyper-parameter search: Ray Tune over the training job, the Train V2 way.

A ``Tuner`` runs a driver function per trial; each trial applies its sampled values to the config, opens a
nested MLflow run under the search's parent run, and runs a ``TorchTrainer`` (named from the trial id, so a
re-run resumes it) whose reports reach Tune through ``TuneReportCallback``. ASHA stops weak trials early on
``tune.metric``. The parent run gets the results table and the best config. Running the same search name again
resumes an interrupted search.

    ccnet tune -c configs/quickstart_ccnet-tiny_generated-192x192_cpu.yaml --set tune.num_samples=8
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import Config, apply_overrides, config_from_dict, dump_config
from pipeline.redaction import holds_secret

log = logging.getLogger(__name__)


@dataclass
class SearchReport:
    parent_run_id: str | None
    table: str
    best: dict[str, Any]  # the best trial's sampled values
    best_value: float


def param_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """The YAML space (``{"train.lr": {"loguniform": [a, b]}}``) as Ray Tune distributions."""
    from ray import tune

    samplers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": lambda *v: tune.choice(v)}
    result = {}
    for key, spec in space.items():
        if len(spec) != 1 or next(iter(spec)) not in samplers:
            raise ValueError(f"tune.space.{key}: expected one of {sorted(samplers)} with values, got {spec}")
        (kind, values), = spec.items()
        result[key] = samplers[kind](*values)
    return result


def _trial(sampled: dict[str, Any]) -> None:
    """One trial: the config with the sampled values, a nested MLflow run, a TorchTrainer."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.ray_train import fit
    from pipeline.tracking import Tracker, resolve_tracking_uri

    context = ray.tune.get_context()
    values = dict(sampled)
    base, parent = values.pop("_config"), values.pop("_parent_run_id")
    tracking_uri = values.pop("_tracking_uri")
    overrides = [f"{key}={value}" for key, value in values.items()]
    config = config_from_dict(apply_overrides(base, overrides), source=f"trial {context.get_trial_id()}")
    config.run.name = f"{config.tune.name}_{context.get_trial_id()}"
    tracking_uri = tracking_uri or resolve_tracking_uri(config.tracking.uri)
    tracker = Tracker(tracking_uri, config.tracking.experiment, required=False,
                      settle_timeout=config.tracking.settle_timeout)
    tags = {"mlflow.parentRunId": parent} if parent else {}
    run_id = tracker.start(config.run.name, tags=tags)
    tracker.log_params({**config.flat(), **{f"sampled.{k}": v for k, v in values.items()}})
    tracker.flush()
    try:
        fit(config, run_id, tracking_uri, callbacks=[TuneReportCallback()])
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()


def run_search(config: Config) -> SearchReport:
    """Run (or resume) the search ``config.tune`` over ``config``; returns the results and the best values."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.tracking import Tracker, find_run, resolve_tracking_uri
    from pipeline.train import warn_if_not_pretrained

    config = config.with_absolute_paths()
    warn_if_not_pretrained(config)
    if not config.run.ray:
        raise ValueError("run.ray=false: a search runs its trials with Ray")
    tracking_uri = resolve_tracking_uri(config.tracking.uri)
    tracker = Tracker(tracking_uri, config.tracking.experiment, required=config.tracking.required,
                      settle_timeout=config.tracking.settle_timeout)
    previous = find_run(tracking_uri, config.tracking.experiment, config.tune.name)
    parent = tracker.start(config.tune.name, run_id=previous, tags={"ccnet.search": "true"})
    tracker.log_text(dump_config(config), "search_config.yaml")
    tracker.flush()

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(include_dashboard=False)
    filesystem, path = storage.filesystem(config.run.storage)
    if storage.is_s3(config.run.storage):
        storage.ensure_bucket(config.run.storage)
    fs = filesystem if storage.is_s3(config.run.storage) else None
    space = {
        **param_space(config.tune.space),
        # Tune saves the space with the search: a tracking URI with credentials (from MLFLOW_TRACKING_URI)
        # stays out of it, and each trial resolves it from its own environment.
        "_config": config.to_dict(), "_parent_run_id": parent,
        "_tracking_uri": None if holds_secret(tracking_uri) else tracking_uri,
    }
    # The trial function only drives its TorchTrainer, whose workers hold the CPUs/GPUs; Tune refuses an
    # empty request, hence a sliver.
    trainable = tune.with_resources(_trial, {"CPU": 0.1})
    search_path = storage.join(path, config.tune.name) if fs else str(Path(path) / config.tune.name)
    if tune.Tuner.can_restore(search_path, storage_filesystem=fs):
        log.info("resuming search %s", config.tune.name)
        tuner = tune.Tuner.restore(search_path, trainable, param_space=space, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                num_samples=config.tune.num_samples,
                max_concurrent_trials=config.tune.max_concurrent,
                scheduler=ASHAScheduler(
                    time_attr="iteration", metric=config.tune.metric, mode=config.tune.mode,
                    max_t=config.train.iterations, grace_period=config.tune.grace_period,
                    reduction_factor=config.tune.reduction_factor,
                ),
            ),
            run_config=tune.RunConfig(name=config.tune.name, storage_path=path, storage_filesystem=fs),
        )
    results = tuner.fit()
    best = results.get_best_result(metric=config.tune.metric, mode=config.tune.mode, scope="all")
    keys = list(config.tune.space)
    header = f"| trial | {' | '.join(keys)} | {config.tune.metric} | iterations |"
    lines = [header, "|---" * (len(keys) + 3) + "|"]
    for result in results:
        sampled = result.config or {}
        metrics = result.metrics or {}
        values = " | ".join(f"{sampled.get(key)}" for key in keys)
        score = metrics.get(config.tune.metric)
        lines.append(
            f"| {metrics.get('trial_id', '?')} | {values} | "
            f"{'-' if score is None else f'{score:.4f}'} | {metrics.get('iteration', '-')} |"
        )
    table = "\n".join(lines)
    best_values = {key: best.config[key] for key in keys}
    tracker.log_text(table, "search/results.md")
    best_value = best.metrics[config.tune.metric]
    tracker.log_dict({"best": best_values, config.tune.metric: best_value}, "search/best.json")
    best_config = apply_overrides(config.to_dict(), [f"{k}={v}" for k, v in best_values.items()])
    tracker.log_text(dump_config(config_from_dict(best_config)), "search/best_config.yaml")
    tracker.end()
    return SearchReport(parent, table, best_values, best_value)
