"""The training job, driver side: track, train (with or without Ray), evaluate the paper's way, record.

``run_training(config)`` opens (or, for a run name seen before, continues) the MLflow run, logs the resolved
config, trains, then evaluates the best checkpoint single-scale and multi-scale + flip and records the
results table, the checkpoints, the final model and the plots. Only this process talks to MLflow at the
start and the end; during training rank 0 logs the metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ccnet.models import CCNet
from pipeline.config import Config
from pipeline.eval.checkpoint import evaluate_checkpoint
from pipeline.eval.results import protocol_table
from pipeline.io import storage
from pipeline.io.checkpoints import CHECKPOINT_FILE, CheckpointStore, from_bytes, load
from pipeline.tracking.base import Tracker
from pipeline.train.context import RunContext, open_run, resolve
from pipeline.train.loop import train_loop
from pipeline.train.record import (
    describe_results,
    log_attention_plot,
    log_bytes,
    log_final_results,
    log_plots,
    log_run_context,
    record_model,
)
from pipeline.train.sessions import LocalSession

log = logging.getLogger(__name__)


@dataclass
class TrainingReport:
    run_id: str | None
    tracking_uri: str
    results: dict[str, Any]  # protocol -> EvalResult
    table: str
    best_checkpoint: str
    tracker: Tracker  # ended; e.g. ``tracker.browse_hint()``: where to look at the run


def _train_and_record(run: RunContext) -> tuple[dict[str, Any], str, str]:

    spec, tracker = run.spec, run.tracker
    config = spec.config
    log_run_context(tracker, spec)
    store = CheckpointStore(spec.run_uri)
    if config.run.ray:
        from pipeline.train.ray_train import fit  # lazy: only a run with run.ray loads Ray

        result = fit(spec, tracker.run_id)
        with result.checkpoint.as_directory() as folder:
            last = (Path(folder) / CHECKPOINT_FILE).read_bytes()
    else:
        session = LocalSession(spec.run_uri, keep=config.train.keep_checkpoints)
        train_loop(spec, session, tracker.run_id, tracker)
        last = storage.read_bytes(store.latest() or store.best_uri())
    run.lease.check()  # another writer took the run over meanwhile: publish nothing as this run's
    best = store.best_uri()
    model, dataset, results = evaluate_checkpoint(config, best, reuse_validation=True, manifest=spec.manifest)
    tracker.settle()  # an outage near the end: wait for the server before the final results and files
    table = protocol_table(results)
    log_final_results(tracker, results, config.train.iterations)
    best_bytes = storage.read_bytes(best)
    state = load(best)
    made_best = {"ccnet.best.iteration": str(state["iteration"])}
    if state.get("best_miou") is not None:
        made_best["ccnet.best.val_mIoU"] = f"{state['best_miou']:.4f}"
    # The diagnostics of every validation: the last checkpoint's (the best one's stop at the best iteration).
    final = state if last == best_bytes else from_bytes(last, "the last checkpoint")
    history = final.get("attention_history", [])  # none in a checkpoint from before the diagnostics
    note = describe_results(config, results, state, dataset.manifest, history)
    tracker.describe(note)
    tracker.set_tags(made_best)
    if last != best_bytes:  # the same bytes once: often the last checkpoint is the best
        log_bytes(tracker, last, "checkpoints/last")
    log_plots(tracker, config, cast(CCNet, model), dataset, results)  # built by build_ccnet
    log_attention_plot(tracker, config, history)
    log_bytes(tracker, best_bytes, "checkpoints/best")
    record_model(tracker, config, model, results, dataset.manifest, best_bytes)
    return results, table, best


def run_training(config: Config) -> TrainingReport:
    """Train ``config`` end to end and record it; returns what the command prints."""
    config = resolve(config)
    # One writer per run: a second command with this run.name stops in open_run, before MLflow or Ray.
    with open_run(
        config, config.run.name, f"run {config.run.name!r}", tags={"ccnet.model": config.model.name}
    ) as run:
        results, table, best = _train_and_record(run)
    return TrainingReport(run.tracker.run_id, run.spec.tracking_uri, results, table, best, run.tracker)
