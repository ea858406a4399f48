"""Hyper-parameter search: Ray Tune over the training job, the Train V2 way.

A ``Tuner`` runs a driver function per trial; each trial applies its sampled values to the config, opens a
nested MLflow run under the search's parent run, and runs a ``TorchTrainer`` (named from the trial id, so a
re-run resumes it) whose reports reach Tune through ``TuneReportCallback``. ASHA stops weak trials early on
``tune.metric`` (``tune.scheduler: none`` lets every trial finish). The parent run gets the results table and
the best config. Running the same search name again resumes an interrupted search; finished trials are not
run again, and a trial started again (so too one whose process was lost with its node, up to
``run.max_failures`` times) continues its checkpoints and its nested run. An ablation is such a search over a
grid of named model variants and seeds (:mod:`pipeline.train.ablation`).

    ccnet tune -c configs/quickstart_ccnet-tiny_generated-192x192_cpu.yaml --set tune.num_samples=8
    ccnet tune -c configs/ablation_ccnet-tiny_generated-256x256_cpu.yaml
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from pipeline import interrupts
from pipeline.config import Config, apply_overrides, config_from_dict, dump_config
from pipeline.eval.checkpoint import evaluate_checkpoint
from pipeline.io import storage
from pipeline.io.checkpoints import CheckpointStore, from_bytes, load
from pipeline.tracking.base import Tracker
from pipeline.train import ablation
from pipeline.train.context import ended_with_status, open_run, resolve, start_tracker
from pipeline.train.ray_train import fit, project_logging, ray_storage
from pipeline.train.record import (
    describe_results,
    log_attention_plot,
    log_final_results,
    log_run_context,
    record_model,
)
from pipeline.train.spec import RunSpec

log = logging.getLogger(__name__)


@dataclass
class SearchReport:
    parent_run_id: str | None
    table: str
    best: dict[str, Any]  # the best trial's sampled values
    best_value: float
    ablation: str | None = None  # the per-variant table of an ablation (markdown)


def param_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """The YAML space (``{"train.lr": {"loguniform": [a, b]}}``, checked by the config) as Ray Tune
    distributions."""

    samplers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": lambda *v: tune.choice(v)}
    return {key: samplers[kind](*values) for key, spec in space.items() for kind, values in spec.items()}


VARIANT = ablation.VARIANT  # the grid's axis over tune.variants (an ablation)
TRIAL_CPUS = 0.1  # a trial's own process only drives its TorchTrainer


# What the search space of a search started before the run spec carried; a resumed one still holds them.
_LEGACY_KEYS = ("_config", "_parent_run_id", "_tracking_uri")


def trial_name(search: Config, variant: str | None, values: dict[str, Any], trial_id: str) -> str:
    """A trial's run name: ``<tune.name>_<variant>_seed<seed>`` in an ablation (one trial per variant and
    seed, unless a space is sampled as well: then the trial id follows), else ``<tune.name>_<trial id>``."""
    if variant is None:
        return f"{search.tune.name}_{trial_id}"
    seed = values.get("train.seed", search.train.seed)
    return f"{search.tune.name}_{variant}_seed{seed}" + (f"_{trial_id}" if search.tune.space else "")


def _trial(sampled: dict[str, Any], search: RunSpec, search_run_id: str | None) -> None:
    """One trial of the search ``search`` (whose tracked run is ``search_run_id``): the config with its
    variant's overrides and the sampled values, a nested run, a TorchTrainer, then the best checkpoint
    evaluated single-scale and multi-scale + flip (reported to Tune as the trial's last result)."""

    started = time.monotonic()
    project_logging()
    trial_id = ray.tune.get_context().get_trial_id()
    values = {key: value for key, value in sampled.items() if key not in _LEGACY_KEYS}
    variant = values.pop(VARIANT, None)
    overrides = [
        *(search.config.tune.variants[variant] if variant else []),
        *(f"{key}={value}" for key, value in values.items()),
    ]
    spec = search.derive(
        overrides,
        trial_name(search.config, variant, values, trial_id),
        search_run_id,
        source=f"trial {trial_id}",
    )
    config = spec.config
    tags = {"ccnet.variant": variant, "ccnet.seed": str(config.train.seed)} if variant is not None else {}
    # A trial's run is optional: a tracking outage must not fail one trial of a search. A trial started again
    # (Tune's restart after its process was lost with its node, or a resumed search) continues its nested
    # run, as its TorchTrainer continues the run's checkpoints.
    tracker = start_tracker(
        config,
        spec.tracking_uri,
        spec.name,
        resume=spec.parent_run_id is not None,
        parent_run_id=spec.parent_run_id,
        tags=tags,
        required=False,
    )
    with ended_with_status(tracker):
        log_run_context(tracker, spec, variant, {f"sampled.{k}": v for k, v in values.items()})
        tracker.flush()
        result = fit(spec, tracker.run_id, callbacks=[TuneReportCallback()])
        with result.checkpoint.as_directory() as folder:
            last = load(folder)
        final = _final_evaluation(spec, tracker, last.get("attention_history", []))
        # What the trial cost uninterrupted: this start whole (the final evaluation included), plus what its
        # earlier starts trained up to the checkpoint this one continued (Tune's time_total_s: this start).
        metrics = result.metrics or {}
        final[ablation.WALL] = time.monotonic() - started + metrics.get("train/seconds_before_start", 0.0)
        tracker.log_metrics({ablation.WALL: final[ablation.WALL]}, step=config.train.iterations)
    ray.tune.report({**metrics, **final})


def _final_evaluation(
    spec: RunSpec, tracker: Tracker, attention_history: list[tuple[int, dict[str, float]]]
) -> dict[str, float]:
    """The best checkpoint's single-scale and multi-scale + flip results, logged to the trial's run with
    its description (which says when the attention never engaged) and the attention's plot; the model is a
    new version of the task's registered model, as a training's is."""
    config = spec.config
    best = CheckpointStore(spec.run_uri).best_uri()
    model, dataset, results = evaluate_checkpoint(config, best, reuse_validation=True, manifest=spec.manifest)
    metrics = log_final_results(tracker, results, config.train.iterations)
    best_bytes = storage.read_bytes(best)
    note = describe_results(
        config, results, from_bytes(best_bytes, "the best checkpoint"), dataset.manifest, attention_history
    )
    tracker.describe(note)
    log_attention_plot(tracker, config, attention_history)
    record_model(tracker, config, model, results, dataset.manifest, best_bytes)
    return {key: value for key, value in metrics.items() if value == value}  # NaN: a class never seen


def _table(results: Any, keys: list[str], metric: str) -> str:
    """One row per trial: its sampled values, the searched metric, the final mIoU, its iterations."""
    header = f"| trial | {' | '.join(keys)} | {metric} | final single | final ms+flip | iterations |"
    lines = [header, "|---" * (len(keys) + 5) + "|"]

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for result in results:
        sampled = result.config or {}
        metrics = result.metrics or {}
        values = " | ".join(f"{sampled.get(key)}" for key in keys)
        lines.append(
            f"| {metrics.get('trial_id', '?')} | {values} | {number(metrics.get(metric))} | "
            f"{number(metrics.get(ablation.SINGLE))} | {number(metrics.get(ablation.MULTI))} | "
            f"{metrics.get('iteration', '-')}{' (failed)' if result.error else ''} |"
        )
    return "\n".join(lines)


def _record_ablation(
    tracker: Tracker,
    config: Config,
    results: Any,
    costs: dict[str, ablation.VariantCost],
    classes: Sequence[str],
) -> str:
    """The per-variant table (markdown, CSV), chart and per-class IoU table on the parent run; returns the
    per-variant markdown."""

    trials = [
        ablation.Trial(
            result.config[VARIANT],
            int(result.config["train.seed"]),
            dict(result.metrics or {}),
            error=None if result.error is None else str(result.error).splitlines()[0],
        )
        for result in results
        if result.config and VARIANT in result.config
    ]
    baseline = config.tune.baseline
    rows = ablation.summarise(trials, costs, baseline)
    table = ablation.results_table(rows, baseline)
    tracker.log_text(table, "ablation/results.md")
    tracker.log_text(ablation.results_csv(rows, baseline), "ablation/results.csv")
    tracker.log_figure(ablation.results_figure(rows, baseline, config.tune.name), "ablation/chart.png")
    per_class = ablation.class_table(trials, list(costs), classes, baseline)
    tracker.log_text(per_class, "ablation/per_class.md")
    return table


def run_search(config: Config) -> SearchReport:
    """Run (or resume) the search ``config.tune`` over ``config``; returns the results and the best values.

    With ``tune.variants`` the search is an ablation: a grid of every variant crossed with ``tune.seeds``
    (and the space's samples), whose parent run also gets the per-variant table and chart (with
    ``tune.baseline``, each variant's paired differences to it).
    """

    config = resolve(config)
    if not config.run.ray:
        raise ValueError("run.ray=false: a search runs its trials with Ray")
    # Everything that can be refused is checked before the parent run and Ray start.
    sampled = param_space(config.tune.space)
    variants = ablation.variant_configs(config)
    if variants:
        grid = {VARIANT: tune.grid_search(list(variants)), "train.seed": tune.grid_search(config.tune.seeds)}
        sampled = {**grid, **sampled}
    tags = {"ccnet.search": "true", **({"ccnet.ablation": "true"} if variants else {})}
    # One writer per search: a second command with this tune.name stops in open_run, before MLflow or Tune.
    with open_run(
        config,
        config.tune.name,
        f"search {config.tune.name!r}",
        tags=tags,
        resume=True,
        driver_cpus=TRIAL_CPUS,
        search=True,
    ) as run:
        costs = ablation.variant_costs(variants, run.spec.manifest.num_classes, config.data.crop_size)
        run.tracker.log_text(dump_config(config), "search_config.yaml")
        run.tracker.flush()
        report = _search(run.spec, run.tracker, sampled, variants, costs)
    return report


def _tuner(
    spec: RunSpec, search_run_id: str | None, space: dict[str, Any], ablation_grid: bool, fs: Any, path: str
) -> tune.Tuner:
    """The search's Tuner: restored from ``<path>/<tune.name>`` when an earlier run of it is there (its
    finished trials are not run again), else a new one. Each trial receives the search's spec and run id
    through ``tune.with_parameters`` (Ray's object store), never through the space, which Tune saves."""
    config = spec.config
    # The trial function only drives its TorchTrainer, whose workers hold the CPUs/GPUs; Tune refuses an
    # empty request, hence a sliver.
    trainable = tune.with_resources(
        tune.with_parameters(_trial, search=spec, search_run_id=search_run_id), {"CPU": TRIAL_CPUS}
    )
    search_path = storage.join(path, config.tune.name) if fs else str(Path(path) / config.tune.name)
    if tune.Tuner.can_restore(search_path, storage_filesystem=fs):
        log.info("resuming search %s", config.tune.name)
        try:
            tuner = tune.Tuner.restore(search_path, trainable, param_space=space, storage_filesystem=fs)
        except Exception as error:
            raise RuntimeError(
                f"search {config.tune.name} at {storage.redact(search_path)} cannot be resumed "
                f"({str(error).splitlines()[0]}); choose another tune.name or delete that folder"
            ) from None
    else:
        scheduler = None
        if config.tune.scheduler == "asha":
            scheduler = ASHAScheduler(
                time_attr="iteration",
                metric=config.tune.metric,
                mode=config.tune.mode,
                max_t=config.train.iterations,
                grace_period=config.tune.grace_period,
                reduction_factor=config.tune.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                # A grid alone runs each point once; num_samples would repeat the whole grid.
                num_samples=config.tune.num_samples if config.tune.space or not ablation_grid else 1,
                max_concurrent_trials=config.tune.max_concurrent,
                scheduler=scheduler,
            ),
            # A trial whose process is lost (with its node: on a head without CPUs, trials run on the worker
            # nodes) is started again, up to run.max_failures times; Ray Train restarts lost workers.
            # TODO: Tune cannot tell a lost process from an error, so a trial failing in its own code (after
            # Ray Train's run.max_failures restarts) is also started again: up to (max_failures + 1)^2 tries.
            run_config=tune.RunConfig(
                name=config.tune.name,
                storage_path=path,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=config.run.max_failures),
            ),
        )
    return tuner


def _fit(tuner: tune.Tuner, tracker: Tracker) -> Any:
    """``tuner.fit()``; Ctrl-C or SIGTERM stops the search the way Tune resumes it (its state saved, the
    unfinished trials left to be continued), then the trials' runs still RUNNING are marked KILLED and
    KeyboardInterrupt goes on (the parent run KILLED, exit 130/143), whatever Tune returned."""
    # Tune's own SIGINT handler would swallow the signal and return the partial search as a result; its
    # SIGUSR1 handler stops it the same way but leaves the signal to us. SIGTERM reaches Tune no other way.
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return tuner.fit()
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # until Tune installs its own
    stopped: list[float] = []  # when: a trial whose process saw the stop as an error is KILLED too

    def stop() -> None:
        stopped.append(time.time())
        os.kill(os.getpid(), signal.SIGUSR1)

    try:
        with interrupts.deferred(stop):
            return tuner.fit()
    except KeyboardInterrupt:
        killed = tracker.end_children("KILLED", failed_since=stopped[0] if stopped else None)
        log.info("search stopped: %d trial run(s) marked KILLED; the same command resumes it", killed)
        raise
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _search(
    spec: RunSpec,
    tracker: Tracker,
    space: dict[str, Any],
    variants: dict[str, Config],
    costs: dict[str, ablation.VariantCost],
) -> SearchReport:
    """The search itself, under the parent run that ``tracker`` holds open."""
    config, parent = spec.config, tracker.run_id
    fs, path = ray_storage(config.run.storage)
    grid = _fit(_tuner(spec, parent, space, bool(variants), fs, path), tracker)
    results = [grid[i] for i in range(len(grid))]
    if all(result.error is not None for result in results):
        first = str(results[0].error).strip().splitlines()[0][:200]
        raise RuntimeError(f"search {config.tune.name}: no trial finished; the first failed with: {first}")
    best = grid.get_best_result(metric=config.tune.metric, mode=config.tune.mode, scope="all")
    keys = ([VARIANT, "train.seed"] if variants else []) + list(config.tune.space)
    table = _table(results, keys, config.tune.metric)
    tracker.log_text(table, "search/results.md")
    best_values = {key: (best.config or {})[key] for key in keys}
    best_value = (best.metrics or {})[config.tune.metric]
    tracker.log_dict({"best": best_values, config.tune.metric: best_value}, "search/best.json")
    best_overrides = [f"{k}={v}" for k, v in best_values.items() if k != VARIANT]
    if VARIANT in best_values:
        best_overrides = [*config.tune.variants[best_values[VARIANT]], *best_overrides]
    best_config = apply_overrides(config.to_dict(), best_overrides)
    best_config["tune"]["variants"] = {}
    best_config["tune"]["baseline"] = None  # it names a variant, and the best config is no ablation
    tracker.log_text(dump_config(config_from_dict(best_config)), "search/best_config.yaml")
    ablation_table = None
    if variants:
        ablation_table = _record_ablation(tracker, config, results, costs, spec.manifest.classes)
    return SearchReport(parent, table, best_values, best_value, ablation_table)
