"""The configured model: what ``model`` in a run's config builds (:func:`build_model`), the input
normalisation its backbone's weights expect, and the warning for a backbone left without them. Below both
evaluation and training, which build the same model from the same config."""

from __future__ import annotations

import logging

from torch import nn

from ccnet import build_ccnet, model_config
from ccnet.backbones import Normalization, backbone_normalization
from pipeline.config.schema import Config
from pipeline.io import storage

log = logging.getLogger("pipeline.config")


def build_model(config: Config, num_classes: int, *, pretrained: bool = True) -> nn.Module:
    """The configured model; ``pretrained=False`` skips the backbone's ImageNet weights (a checkpoint is
    about to replace every weight, so evaluation and prediction need neither the file nor its package)."""
    overrides = config.model.overrides()
    if not pretrained:
        overrides.pop("pretrained", None)
    elif "://" in (overrides.get("pretrained") or ""):  # s3:// (a local copy) or file://
        try:
            overrides["pretrained"] = storage.local_copy(overrides["pretrained"])
        except FileNotFoundError:
            raise FileNotFoundError(
                f"model.pretrained: {storage.redact(config.model.pretrained or '')} does not exist"
            ) from None
    return build_ccnet(config.model.name, num_classes, **overrides)


def input_normalization(config: Config) -> Normalization:
    """The ``(image - mean) / std`` that the configured model's backbone weights expect (the backbone's
    description owns it): training transforms, evaluation, prediction and checkpoints all use this."""
    return backbone_normalization(model_config(config.model.name, **config.model.overrides()).backbone)


# Backbones that train from scratch by design; every other one is started from ImageNet by its recipes.
_FROM_SCRATCH_BACKBONES = ("tiny",)


def warn_if_not_pretrained(config: Config) -> bool:
    """Log one WARNING when ``config`` trains a backbone without the ImageNet weights its recipe expects.

    That is ``model.pretrained`` left null for any backbone but the tiny one; ``pretrained: none`` says no
    weights on purpose and stays silent. Call it once, on the driver.

    Returns:
        Whether it warned.
    """
    if config.model.pretrained is not None:
        return False
    backbone = model_config(config.model.name).backbone
    if backbone in _FROM_SCRATCH_BACKBONES:
        return False
    log.warning(
        "model.pretrained is null: %s (backbone %s) trains from random weights, far from the paper's "
        "accuracy; set model.pretrained to ImageNet weights, or to none to train from scratch on purpose",
        config.model.name,
        backbone,
    )
    return True
