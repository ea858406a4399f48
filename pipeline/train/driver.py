"""The training job, driver side: track, train (with or without Ray), evaluate the paper's way, record.

``run_training(config)`` opens (or, for a run name seen before, continues) the MLflow run, logs the resolved
config, trains, then evaluates the best checkpoint single-scale and multi-scale + flip and records the
results table, the checkpoints, the final model and the plots. Only this process talks to MLflow at the
start and the end; during training rank 0 logs the metrics.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ccnet.attention_maps import ccnet_attention_maps
from ccnet.backbones import Normalization
from ccnet.diagnostics import ENGAGED_SHARE, never_engaged_note
from ccnet.inference import LogitsOnly
from ccnet.models import CCNet
from pipeline.config import Config, dump_config
from pipeline.data.readers import ShardDataset, open_manifest
from pipeline.data.schema import Manifest
from pipeline.data.transforms import build_eval_transform
from pipeline.eval.evaluation import evaluate_protocols
from pipeline.eval.plots import (
    attention_diagnostics_figure,
    attention_maps_figure,
    confusion_matrix_figure,
    overlay_figure,
)
from pipeline.eval.results import EvalResult, protocol_table, summary_metrics
from pipeline.io import storage
from pipeline.io.checkpoints import (
    CHECKPOINT_FILE,
    CheckpointStore,
    checkpoint_normalization,
    from_bytes,
    load,
    load_model_state,
)
from pipeline.tracking.base import Tracker
from pipeline.tracking.mlflow_store import COMPARABLE
from pipeline.train.build import build_model
from pipeline.train.context import RunContext, open_run, resolve
from pipeline.train.identity import dataset_digest
from pipeline.train.loop import train_loop
from pipeline.train.sessions import LocalSession
from pipeline.train.spec import RunSpec

log = logging.getLogger(__name__)


@dataclass
class TrainingReport:
    run_id: str | None
    tracking_uri: str
    results: dict[str, Any]  # protocol -> EvalResult
    table: str
    best_checkpoint: str


_OPERATIONAL = ("run.resource_wait", "run.lease_ttl", "train.log_every", "data.loader_workers")
_RESOLVED = ("backbone", "attention", "recurrence", "placement", "output_stride", "reduction",
             "head_channels", "align_corners", "embedding_channels")


def run_params(config: Config) -> dict[str, Any]:
    """What defines a training, as MLflow params: the model as built (the registry's values where the config
    says null), the data, recipe, evaluation and workers; not the tracking or search settings, nor knobs that
    do not change the result. The whole resolved config is the run's ``config.yaml``."""
    model = config.model.resolved()
    params = {key: value for key, value in config.flat().items()
              if not key.startswith(("tracking.", "tune.", "model.")) and key not in _OPERATIONAL}
    params |= {"model.name": config.model.name, "model.pretrained": config.model.pretrained,
               "model.sync_bn": config.model.sync_bn, **{f"model.{f}": getattr(model, f) for f in _RESOLVED}}
    return params


def variant_label(config: Config) -> str:
    """A short name of the model variant for the runs table, e.g. ``criss_cross R=2 head os8``."""
    params = run_params(config)
    if params["model.recurrence"] == 0:
        return f"fcn os{params['model.output_stride']}"
    return (f"{params['model.attention']} R={params['model.recurrence']} {params['model.placement']} "
            f"os{params['model.output_stride']}")


def log_run_context(tracker: Tracker, spec: RunSpec, variant: str | None = None,
                    extra_params: dict[str, Any] | None = None) -> None:
    """Params, the variant tag (``variant``, else :func:`variant_label`), the resolved config and the
    dataset version as the run's inputs."""
    config, manifest = spec.config, spec.manifest
    tracker.log_params({**run_params(config), **(extra_params or {})})
    tracker.set_tags({"ccnet.variant": variant or variant_label(config), "ccnet.model": config.model.name})
    tracker.log_text(dump_config(config), "config.yaml")
    for split in (config.data.train_split, config.data.val_split):
        profile = {"split": split, "samples": manifest.counts.get(split, 0), "classes": len(manifest.classes)}
        digest = dataset_digest(manifest, split)
        context = "training" if split == config.data.train_split else "validation"
        name = f"{manifest.dataset}/{manifest.version}/{split}"
        tracker.log_dataset(name, digest, config.data.uri, profile, context)


def describe_results(config: Config, results: dict[str, Any], best: dict[str, Any], manifest: Any,
                     attention_history: Sequence[tuple[int, dict[str, float]]] = ()) -> str:
    """The run's description (``mlflow.note.content``): what it is and its headline results, and a sentence
    when its attention never engaged (``attention_history``: the training's, :mod:`ccnet.diagnostics`)."""
    figures = ", ".join(f"{result.miou * 100:.1f} {protocol}" for protocol, result in results.items())
    note = (f"{config.model.name} ({variant_label(config)}) trained {config.train.iterations} iterations on "
            f"{manifest.dataset} {manifest.version} {config.data.train_split}, crop {config.data.crop_size}. "
            f"Val mIoU ({config.data.val_split}) of the best checkpoint (iteration {best['iteration']}): "
            f"{figures}. Files: checkpoints/best, evaluation/results.md (per class), plots/.")
    unengaged = never_engaged_note([diagnostics for _, diagnostics in attention_history])
    if unengaged:
        note += f" {unengaged[0].upper()}{unengaged[1:]}: see plots/attention_diagnostics.png."
    return note


def _denormalise(image: torch.Tensor, normalization: Normalization) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8 for plots."""
    mean = torch.tensor(normalization.mean).view(3, 1, 1)
    std = torch.tensor(normalization.std).view(3, 1, 1)
    return ((image * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


def _log_plots(tracker: Tracker, model: CCNet, dataset: ShardDataset, results: dict[str, Any],
               run_name: str) -> None:
    """Every figure names the run and what it shows, so it stands alone in the compare view."""

    best = results["multi-scale+flip"]
    title = f"{run_name}: {dataset.split}, multi-scale + flip (mIoU {best.miou * 100:.1f})"
    figure = confusion_matrix_figure(best.confusion, dataset.classes, title=title)
    tracker.log_figure(figure, "plots/confusion_matrix.png")
    samples = [dataset[index] for index in range(min(4, len(dataset)))]
    with torch.inference_mode():
        predictions = [model(s["image"][None])["out"].argmax(1)[0].numpy() for s in samples]
    images = [_denormalise(s["image"], model.normalization) for s in samples]
    labels = [s["label"].numpy() for s in samples]
    figure = overlay_figure(images, predictions, labels, dataset.manifest.palette, dataset.ignore_index,
                            class_names=dataset.classes, title=f"{run_name}: {dataset.split}, single-scale")
    tracker.log_figure(figure, "plots/predictions.png")
    if model.config.attention == "criss_cross" and model.config.recurrence >= 1:
        height, width = images[0].shape[:2]
        pixels = [(height // 2, width // 4), (height // 4, 3 * width // 4)]
        maps = ccnet_attention_maps(model, samples[0]["image"][None], pixels, recurrence=2)
        figure = attention_maps_figure(images[0], maps[:, 0].numpy(), pixels,
                                       title=f"{run_name}: where two pixels look after R=1 and R=2")
        tracker.log_figure(figure, "plots/attention.png")


def evaluate_checkpoint(
    config: Config, checkpoint_uri: str, split: str | None = None, reuse_validation: bool = False,
    manifest: Manifest | None = None,
) -> tuple[torch.nn.Module, ShardDataset, dict]:
    """Load a checkpoint and evaluate it single-scale and multi-scale + flip on ``split`` (default: the
    config's ``data.val_split``), normalising images as the checkpoint's model expects. ``manifest``: the
    dataset's, when the caller read it already.

    With ``reuse_validation`` (a training's own best checkpoint, evaluated with the training's config), the
    single-scale result is the validation that made the checkpoint best, stored with it, instead of a second
    pass over the same images computing the same figures."""

    manifest = manifest if manifest is not None else open_manifest(config.data.uri)
    model = build_model(config, manifest.num_classes, pretrained=False)
    state = load(checkpoint_uri)
    load_model_state(model, state, storage.redact(checkpoint_uri))
    model.eval()
    normalization = checkpoint_normalization(state, model)
    dataset = ShardDataset(
        config.data.uri, split or config.data.val_split, manifest=manifest,
        transform=build_eval_transform(normalization.mean, normalization.std),
    )
    # The training validated in its AMP precision; the final results are in float32.
    same = reuse_validation and split in (None, config.data.val_split) and config.train.amp == "O0"
    stored = state.get("val_result") if same else None
    single_scale = EvalResult.from_state(stored) if stored else None
    if single_scale and (single_scale.mode, single_scale.fusion) != (config.eval.mode, config.eval.fusion):
        single_scale = None
    results = evaluate_protocols(
        model, dataset, eval_config=config.eval, num_classes=manifest.num_classes,
        ignore_index=manifest.ignore_index, single_scale=single_scale,
    )
    return model, dataset, results


def log_final_results(tracker: Tracker, results: dict[str, Any], step: int) -> dict[str, float]:
    """Log the protocols' results once, under short names (``final/mIoU_ss``, ``final/mIoU_ms_flip``, ...:
    :func:`pipeline.eval.results.summary_metrics`), and the table as ``evaluation/results.md``; returns the
    metrics logged (NaN for a class never seen)."""

    metrics = summary_metrics(results)
    tracker.log_metrics(metrics, step=step)
    tracker.log_text(protocol_table(results), "evaluation/results.md")
    return metrics


def registered_model_name(config: Config, manifest: Manifest) -> str:
    """The registered model a training's best model is a version of: ``tracking.registered_model``, else one
    per task, ``ccnet-<dataset>`` (e.g. ``ccnet-camvid``), so every variant trained on it competes."""
    return config.tracking.registered_model or f"ccnet-{manifest.dataset}"


def record_model(tracker: Tracker, config: Config, model: nn.Module, results: dict[str, Any],
                 manifest: Manifest, checkpoint: bytes) -> None:
    """Logs the best model, named after its variant, with its checkpoint and scores, as a new version of
    :func:`registered_model_name`, tagged with its variant, dataset version and evaluation protocol: the
    version becomes ``champion`` only by beating it on the same dataset version and protocol."""
    evaluation = config.eval
    protocol = (f"{config.data.val_split} {evaluation.mode} scales={list(evaluation.scales)} "
                f"flip={evaluation.flip} fusion={evaluation.fusion}")
    if evaluation.mode == "slide":
        protocol += f" crop={evaluation.crop_size} stride={evaluation.stride}"
    digest = dataset_digest(manifest)
    tags = {"ccnet.variant": variant_label(config), "ccnet.dataset": f"{manifest.dataset}/{manifest.version}",
            "ccnet.dataset.digest": digest, "ccnet.protocol": protocol,
            COMPARABLE: f"{digest[:16]} {protocol}"}
    name = registered_model_name(config, manifest)
    logged = re.sub(r"[^A-Za-z0-9_.-]+", "-", variant_label(config).replace("R=", "R"))
    scores = {"val_mIoU": results["multi-scale+flip"].miou,
              "val_mIoU_single_scale": results["single-scale"].miou}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / CHECKPOINT_FILE
        path.write_bytes(checkpoint)
        onnx_file = _export_onnx(config, model, manifest, Path(folder) / "model.onnx")
        version = tracker.log_model(LogitsOnly(model).eval(), name=logged, registered_name=name,
                                    metrics=scores, checkpoint=str(path), version_tags=tags,
                                    onnx_file=onnx_file)
    if version is not None:
        log.info("registered model %s version %s (models:/%s@candidate)", name, version, name)


def _export_onnx(config: Config, model: nn.Module, manifest: Manifest, path: Path) -> str | None:
    """The model exported to ``path`` (:mod:`pipeline.eval.onnx`), or None, with a warning, when onnx is
    not installed or the export fails: the training's models are then logged without it."""
    try:
        from pipeline.eval.onnx import export_checkpoint, onnx_metadata

        normalization = cast(Normalization, model.normalization)
        metadata = onnx_metadata(config, normalization, len(manifest.classes), classes=list(manifest.classes),
                                 palette=manifest.palette, variant=variant_label(config))
        log.info("ONNX export: %s", export_checkpoint(model, path, metadata))
        return str(path)
    except (ImportError, RuntimeError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        log.warning("model not exported to ONNX (%s): logged as pt2 only", reason)
        return None


def _log_bytes(tracker: Tracker, data: bytes, artifact_path: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / CHECKPOINT_FILE
        path.write_bytes(data)
        tracker.log_artifact(str(path), artifact_path)


def log_attention_plot(tracker: Tracker, config: Config,
                       history: Sequence[tuple[int, dict[str, float]]]) -> None:
    """``plots/attention_diagnostics.png``: the attention's figures at every validation (``history``, a
    training's ``attention_history``); nothing for a model without attention."""
    if history:
        title = f"{config.run.name}: attention on the first val image, per validation"
        tracker.log_figure(attention_diagnostics_figure(history, ENGAGED_SHARE, title=title),
                           "plots/attention_diagnostics.png")


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
    tracker.set_tags({"mlflow.note.content": note, **made_best})
    if last != best_bytes:  # the same bytes once: often the last checkpoint is the best
        _log_bytes(tracker, last, "checkpoints/last")
    _log_plots(tracker, cast(CCNet, model), dataset, results, config.run.name)  # built by build_ccnet
    log_attention_plot(tracker, config, history)
    _log_bytes(tracker, best_bytes, "checkpoints/best")
    record_model(tracker, config, model, results, dataset.manifest, best_bytes)
    return results, table, best


def run_training(config: Config) -> TrainingReport:
    """Train ``config`` end to end and record it; returns what the command prints."""
    config = resolve(config)
    # One writer per run: a second command with this run.name stops in open_run, before MLflow or Ray.
    with open_run(config, config.run.name, f"run {config.run.name!r}",
                  tags={"ccnet.model": config.model.name}) as run:
        results, table, best = _train_and_record(run)
    return TrainingReport(run.tracker.run_id, run.spec.tracking_uri, results, table, best)
