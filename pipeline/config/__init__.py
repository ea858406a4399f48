"""Run configuration: typed dataclasses with visible defaults, YAML overrides, ``--set key=value``.

A config file holds only what differs from the defaults::

    model: {name: ccnet_r101_deepstem_d8, pretrained: /data/resnet101-imagenet.pth}
    data: {uri: s3://bucket/datasets/cityscapes/v1, crop_size: 769, batch_size: 8}
    train: {iterations: 60000, lr: 0.01, ohem: true}

``load_config(path, overrides)`` reads it, applies ``a.b=c`` overrides (values parsed as YAML), and checks
every key and type: an unknown key or a wrong type raises :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.config.checks import validate
from pipeline.config.schema import (
    IMAGENET,
    NO_PRETRAINED,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    build,
    is_explicit_none,
)

__all__ = [
    "IMAGENET",
    "NO_PRETRAINED",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "is_explicit_none",
    "load_config",
    "validate",
]


def apply_overrides(values: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"{source}: expected section.key=value, got {item!r}")
        section, name = key.split(".", 1)
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ConfigError(f"{source}: {section} must be a mapping")
        values[section][name] = yaml.safe_load(text) if text else None
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or none: the defaults), apply overrides, check keys, types and values."""
    source = str(path) if path else "defaults"
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML ({error})".replace("\n", " ")) from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
    apply_overrides(values, overrides or [])
    config = build(Config, values, "", source)
    validate(config, source)
    return config


def config_from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """A Config from a nested dict (e.g. a saved resolved config), checked like a file."""
    config = build(Config, values, "", source)
    validate(config, source)
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML (saved with every run)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
