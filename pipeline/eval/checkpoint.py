"""A checkpoint evaluated the paper's way: single-scale and multi-scale + flip on a split, with the input
normalisation the checkpoint's model was trained with (``ccnet evaluate``, and every training's end)."""

from __future__ import annotations

from typing import Any

import torch

from ccnet.backbones import Normalization
from pipeline.config import Config
from pipeline.config.model import build_model
from pipeline.data.readers import ShardDataset, open_manifest
from pipeline.data.schema import Manifest
from pipeline.data.transforms import build_eval_transform
from pipeline.eval.evaluation import evaluate_protocols
from pipeline.eval.results import EvalResult
from pipeline.io import storage
from pipeline.io.checkpoints import checkpoint_normalization, load, load_model_state


def load_checkpoint_model(
    config: Config, checkpoint_uri: str, num_classes: int
) -> tuple[torch.nn.Module, dict[str, Any], Normalization]:
    """``config``'s model with the checkpoint's weights, in eval mode; the checkpoint; the input
    normalisation its model was trained with."""
    model = build_model(config, num_classes, pretrained=False)
    state = load(checkpoint_uri)
    load_model_state(model, state, storage.redact(checkpoint_uri))
    model.eval()
    return model, state, checkpoint_normalization(state, model)


def evaluate_checkpoint(
    config: Config,
    checkpoint_uri: str,
    split: str | None = None,
    reuse_validation: bool = False,
    manifest: Manifest | None = None,
) -> tuple[torch.nn.Module, ShardDataset, dict]:
    """Load a checkpoint and evaluate it single-scale and multi-scale + flip on ``split`` (default: the
    config's ``data.val_split``), normalising images as the checkpoint's model expects. ``manifest``: the
    dataset's, when the caller read it already.

    With ``reuse_validation`` (a training's own best checkpoint, evaluated with the training's config), the
    single-scale result is the validation that made the checkpoint best, stored with it, instead of a second
    pass over the same images computing the same figures."""

    manifest = manifest if manifest is not None else open_manifest(config.data.uri)
    model, state, normalization = load_checkpoint_model(config, checkpoint_uri, manifest.num_classes)
    dataset = ShardDataset(
        config.data.uri,
        split or config.data.val_split,
        manifest=manifest,
        transform=build_eval_transform(normalization.mean, normalization.std),
    )
    # The training validated in its AMP precision; the final results are in float32.
    same = reuse_validation and split in (None, config.data.val_split) and config.train.amp == "O0"
    stored = state.get("val_result") if same else None
    single_scale = EvalResult.from_state(stored) if stored else None
    if single_scale and (single_scale.mode, single_scale.fusion) != (config.eval.mode, config.eval.fusion):
        single_scale = None
    results = evaluate_protocols(
        model,
        dataset,
        eval_config=config.eval,
        num_classes=manifest.num_classes,
        ignore_index=manifest.ignore_index,
        single_scale=single_scale,
    )
    return model, dataset, results
