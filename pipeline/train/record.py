"""What a run records besides its metrics: its params and variant label, its inputs (config, dataset
version), its description, its final results, its plots and its model (with ONNX, registered). Used by a
training's driver and by every trial of a search."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ccnet.attention_maps import ccnet_attention_maps
from ccnet.backbones import Normalization
from ccnet.diagnostics import ENGAGED_SHARE, never_engaged_note
from ccnet.inference import LogitsOnly
from ccnet.models import CCNet
from pipeline.config import Config, dump_config
from pipeline.config.model import input_normalization
from pipeline.data.readers import ShardDataset
from pipeline.data.schema import Manifest
from pipeline.eval.plots import (
    attention_diagnostics_figure,
    attention_maps_figure,
    confusion_matrix_figure,
    overlay_figure,
)
from pipeline.eval.results import MULTI_SCALE, SINGLE_SCALE, protocol_table, summary_metrics
from pipeline.io.checkpoints import CHECKPOINT_FILE
from pipeline.tracking.base import Tracker
from pipeline.tracking.mlflow_store import COMPARABLE
from pipeline.train.identity import dataset_digest
from pipeline.train.spec import RunSpec

log = logging.getLogger(__name__)


_OPERATIONAL = ("run.resource_wait", "run.lease_ttl", "train.log_every", "data.loader_workers")
_RESOLVED = (
    "backbone",
    "attention",
    "recurrence",
    "placement",
    "output_stride",
    "reduction",
    "head_channels",
    "align_corners",
    "embedding_channels",
)


def run_params(config: Config) -> dict[str, Any]:
    """What defines a training, as MLflow params: the model as built (the registry's values where the config
    says null), the data, recipe, evaluation and workers; not the tracking or search settings, nor knobs that
    do not change the result. The whole resolved config is the run's ``config.yaml``."""
    model = config.model.resolved()
    params = {
        key: value
        for key, value in config.flat().items()
        if not key.startswith(("tracking.", "tune.", "model.")) and key not in _OPERATIONAL
    }
    params |= {
        "model.name": config.model.name,
        "model.pretrained": config.model.pretrained,
        "model.sync_bn": config.model.sync_bn,
        **{f"model.{f}": getattr(model, f) for f in _RESOLVED},
    }
    return params


def variant_label(config: Config) -> str:
    """A short name of the model variant for the runs table, e.g. ``criss_cross R=2 head os8``."""
    params = run_params(config)
    if params["model.recurrence"] == 0:
        return f"fcn os{params['model.output_stride']}"
    return (
        f"{params['model.attention']} R={params['model.recurrence']} {params['model.placement']} "
        f"os{params['model.output_stride']}"
    )


def log_run_context(
    tracker: Tracker, spec: RunSpec, variant: str | None = None, extra_params: dict[str, Any] | None = None
) -> None:
    """Params, the variant tag (``variant``, else :func:`variant_label`), the resolved config and the
    dataset version as the run's inputs."""
    config, manifest = spec.config, spec.manifest
    tracker.log_params({**run_params(config), **(extra_params or {})})
    tracker.set_tags({"ccnet.variant": variant or variant_label(config), "ccnet.model": config.model.name})
    tracker.log_text(dump_config(config), "config.yaml")
    if spec.class_weights is not None:
        weights = dict(zip(manifest.classes, spec.class_weights, strict=True))
        tracker.log_dict({"method": config.train.class_weights, "weights": weights}, "class_weights.json")
    for split in (config.data.train_split, config.data.val_split):
        profile = {"split": split, "samples": manifest.counts.get(split, 0), "classes": len(manifest.classes)}
        digest = dataset_digest(manifest, split)
        context = "training" if split == config.data.train_split else "validation"
        name = f"{manifest.dataset}/{manifest.version}/{split}"
        tracker.log_dataset(name, digest, config.data.uri, profile, context)


def describe_results(
    config: Config,
    results: dict[str, Any],
    best: dict[str, Any],
    manifest: Any,
    attention_history: Sequence[tuple[int, dict[str, float]]] = (),
) -> str:
    """The run's description (:meth:`Tracker.describe`): what it is and its headline results, and a sentence
    when its attention never engaged (``attention_history``: the training's, :mod:`ccnet.diagnostics`)."""
    figures = ", ".join(f"{result.miou * 100:.1f} {protocol}" for protocol, result in results.items())
    note = (
        f"{config.model.name} ({variant_label(config)}) trained {config.train.iterations} iterations on "
        f"{manifest.dataset} {manifest.version} {config.data.train_split}, crop {config.data.crop_size}. "
        f"Val mIoU ({config.data.val_split}) of the best checkpoint (iteration {best['iteration']}): "
        f"{figures}. Files: checkpoints/best, evaluation/results.md (per class), plots/."
    )
    unengaged = never_engaged_note([diagnostics for _, diagnostics in attention_history])
    if unengaged:
        note += f" {unengaged[0].upper()}{unengaged[1:]}: see plots/attention_diagnostics.png."
    return note


def _denormalise(image: torch.Tensor, normalization: Normalization) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8 for plots."""
    mean = torch.tensor(normalization.mean).view(3, 1, 1)
    std = torch.tensor(normalization.std).view(3, 1, 1)
    return ((image * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


def log_plots(
    tracker: Tracker, config: Config, model: CCNet, dataset: ShardDataset, results: dict[str, Any]
) -> None:
    """The confusion matrix, predictions and attention maps of ``model`` (trained with ``config``) on
    ``dataset``. Every figure names the run and what it shows, so it stands alone in the compare view."""
    run_name, normalization = config.run.name, input_normalization(config)
    best = results[MULTI_SCALE]
    title = f"{run_name}: {dataset.split}, multi-scale + flip (mIoU {best.miou * 100:.1f})"
    figure = confusion_matrix_figure(best.confusion, dataset.classes, title=title)
    tracker.log_figure(figure, "plots/confusion_matrix.png")
    samples = [dataset[index] for index in range(min(4, len(dataset)))]
    with torch.inference_mode():
        predictions = [model(s["image"][None])["out"].argmax(1)[0].numpy() for s in samples]
    images = [_denormalise(s["image"], normalization) for s in samples]
    labels = [s["label"].numpy() for s in samples]
    figure = overlay_figure(
        images,
        predictions,
        labels,
        dataset.manifest.palette,
        dataset.ignore_index,
        class_names=dataset.classes,
        title=f"{run_name}: {dataset.split}, single-scale",
    )
    tracker.log_figure(figure, "plots/predictions.png")
    if model.config.attention == "criss_cross" and model.config.recurrence >= 1:
        height, width = images[0].shape[:2]
        pixels = [(height // 2, width // 4), (height // 4, 3 * width // 4)]
        maps = ccnet_attention_maps(model, samples[0]["image"][None], pixels, recurrence=2)
        figure = attention_maps_figure(
            images[0],
            maps[:, 0].numpy(),
            pixels,
            title=f"{run_name}: where two pixels look after R=1 and R=2",
        )
        tracker.log_figure(figure, "plots/attention.png")


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


def record_model(
    tracker: Tracker,
    config: Config,
    model: nn.Module,
    results: dict[str, Any],
    manifest: Manifest,
    checkpoint: bytes,
) -> None:
    """Logs the best model, named after its variant, with its checkpoint and scores, as a new version of
    :func:`registered_model_name`, tagged with its variant, dataset version and evaluation protocol: the
    version becomes ``champion`` only by beating it on the same dataset version and protocol."""
    evaluation = config.eval
    protocol = (
        f"{config.data.val_split} {evaluation.mode} scales={list(evaluation.scales)} "
        f"flip={evaluation.flip} fusion={evaluation.fusion}"
    )
    if evaluation.mode == "slide":
        protocol += f" crop={evaluation.crop_size} stride={evaluation.stride}"
    digest = dataset_digest(manifest)
    tags = {
        "ccnet.variant": variant_label(config),
        "ccnet.dataset": f"{manifest.dataset}/{manifest.version}",
        "ccnet.dataset.digest": digest,
        "ccnet.protocol": protocol,
        COMPARABLE: f"{digest[:16]} {protocol}",
    }
    name = registered_model_name(config, manifest)
    logged = re.sub(r"[^A-Za-z0-9_.-]+", "-", variant_label(config).replace("R=", "R"))
    scores = {"val_mIoU": results[MULTI_SCALE].miou, "val_mIoU_single_scale": results[SINGLE_SCALE].miou}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / CHECKPOINT_FILE
        path.write_bytes(checkpoint)
        onnx_file = _export_onnx(config, model, manifest, Path(folder) / "model.onnx")
        version = tracker.log_model(
            LogitsOnly(model).eval(),
            name=logged,
            registered_name=name,
            metrics=scores,
            checkpoint=str(path),
            version_tags=tags,
            onnx_file=onnx_file,
        )
    if version is not None:
        log.info("registered model %s version %s (models:/%s@candidate)", name, version, name)


def _export_onnx(config: Config, model: nn.Module, manifest: Manifest, path: Path) -> str | None:
    """The model exported to ``path`` (:mod:`pipeline.eval.onnx`), or None, with a warning, when onnx is
    not installed or the export fails: the training's models are then logged without it."""
    try:
        from pipeline.eval.onnx import export_checkpoint, onnx_metadata

        metadata = onnx_metadata(
            config,
            input_normalization(config),
            len(manifest.classes),
            classes=list(manifest.classes),
            palette=manifest.palette,
            variant=variant_label(config),
        )
        log.info("ONNX export: %s", export_checkpoint(model, path, metadata))
        return str(path)
    except (ImportError, RuntimeError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        log.warning("model not exported to ONNX (%s): logged as pt2 only", reason)
        return None


def log_bytes(tracker: Tracker, data: bytes, artifact_path: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / CHECKPOINT_FILE
        path.write_bytes(data)
        tracker.log_artifact(str(path), artifact_path)


def log_attention_plot(
    tracker: Tracker, config: Config, history: Sequence[tuple[int, dict[str, float]]]
) -> None:
    """``plots/attention_diagnostics.png``: the attention's figures at every validation (``history``, a
    training's ``attention_history``); nothing for a model without attention."""
    if history:
        title = f"{config.run.name}: attention on the first val image, per validation"
        tracker.log_figure(
            attention_diagnostics_figure(history, ENGAGED_SHARE, title=title),
            "plots/attention_diagnostics.png",
        )
