"""The run configuration's values, checked: well-typed but impossible values (a negative learning rate, a
stride beyond the window), model options the model library refuses, a search space that would give a trial
an impossible value, and secrets in a config (every config is saved with its run)."""

from __future__ import annotations

import copy
import math

from pipeline.config.schema import Config, ConfigError, ModelConfig, build
from pipeline.io.paths import LocationError, inside, parse_location, stays_inside
from pipeline.io.redaction import has_userinfo, redact


# One rule per key: a table of about 60 lines reads better than 60 lines split over functions.
def validate(config: Config, source: str = "config") -> None:
    """Values that are well-typed but impossible: ConfigError naming the key and what it expects."""
    c = config
    positive, non_negative, fraction = "a finite number > 0", "a finite number >= 0", "a number in [0, 1)"
    one, zero = "an integer >= 1", "an integer >= 0"
    rules: dict[str, tuple[bool, str]] = {
        "train.iterations": (c.train.iterations >= 1, "an integer >= 1"),
        "train.lr": (0 < c.train.lr < math.inf, positive),
        "train.momentum": (0 <= c.train.momentum < 1, fraction),
        "train.weight_decay": (0 <= c.train.weight_decay < math.inf, non_negative),
        "train.poly_power": (0 < c.train.poly_power < math.inf, positive),
        "train.head_lr_mult": (0 < c.train.head_lr_mult < math.inf, positive),
        "train.stem_lr_mult": (
            c.train.stem_lr_mult is None or 0 < c.train.stem_lr_mult < math.inf,
            positive,
        ),
        "train.aux_weight": (0 <= c.train.aux_weight < math.inf, non_negative),
        "train.ohem_thresh": (0 < c.train.ohem_thresh <= 1, "a probability in (0, 1]"),
        "train.ohem_min_kept": (c.train.ohem_min_kept >= 0, "an integer >= 0"),
        "train.consistency_weight": (0 <= c.train.consistency_weight < math.inf, non_negative),
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
        "data.loader": (c.data.loader == "torch" or c.run.ray, "torch, or ray with run.ray=true"),
        "eval.crop_size": (c.eval.crop_size >= 8, "an integer >= 8"),
        "eval.stride": (1 <= c.eval.stride <= c.eval.crop_size, "an integer in [1, eval.crop_size]"),
        "eval.scales": (
            len(c.eval.scales) > 0 and all(0 < x < math.inf for x in c.eval.scales),
            "a non-empty list of numbers > 0",
        ),
        "eval.max_images": (c.eval.max_images is None or c.eval.max_images >= 1, f"null or {one}"),
        "run.name": (stays_inside(c.run.name), "a name or relative path without '..'"),
        "run.num_workers": (c.run.num_workers >= 1, "an integer >= 1"),
        "run.cpus_per_worker": (0 < c.run.cpus_per_worker < math.inf, positive),
        "run.max_failures": (c.run.max_failures >= -1, "an integer >= 0, or -1 for no limit"),
        "run.resource_wait": (0 <= c.run.resource_wait < math.inf, non_negative),
        "run.lease_ttl": (0 < c.run.lease_ttl < math.inf, positive),
        "tracking.experiment": (bool(c.tracking.experiment.strip()), "a non-empty name"),
        "tracking.settle_timeout": (0 <= c.tracking.settle_timeout < math.inf, non_negative),
        "tracking.registered_model": (
            c.tracking.registered_model is None
            or (
                bool(c.tracking.registered_model.strip())
                and not set("/:%") & set(c.tracking.registered_model)
            ),
            "null or a registered model name without '/', ':' or '%'",
        ),
        "model.recurrence": (c.model.recurrence is None or c.model.recurrence >= 0, f"null or {zero}"),
        "model.embedding_channels": ((c.model.embedding_channels or 0) >= 0, f"null or {zero}"),
        "model.gamma_init": (
            c.model.gamma_init is None or math.isfinite(c.model.gamma_init),
            "null or a finite number",
        ),
        "tune.name": (stays_inside(c.tune.name), "a name or relative path without '..'"),
        "tune.num_samples": (c.tune.num_samples >= 1, "an integer >= 1"),
        "tune.max_concurrent": (c.tune.max_concurrent >= 1, "an integer >= 1"),
        "tune.metric": (bool(c.tune.metric.strip()), "a metric name such as val/mIoU"),
        "tune.seeds": (
            len(c.tune.seeds) > 0
            and len(set(c.tune.seeds)) == len(c.tune.seeds)
            and all(0 <= x < 2**32 for x in c.tune.seeds),
            "distinct integers >= 0",
        ),
        "tune.grace_period": (c.tune.grace_period >= 1, "an integer >= 1"),
        "tune.reduction_factor": (c.tune.reduction_factor >= 2, "an integer >= 2"),
        "tune.baseline": (
            c.tune.baseline is None or c.tune.baseline in c.tune.variants,
            f"null or one of tune.variants: {', '.join(c.tune.variants) or 'none set'}",
        ),
    }
    for key, (ok, expected) in rules.items():
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            raise ConfigError(f"{source}: {key}={value!r} is not allowed (expected {expected})")
    _check_model(config.model, source)
    if config.train.consistency_weight > 0 and not (config.model.embedding_channels or 0) > 0:
        raise ConfigError(
            f"{source}: train.consistency_weight={config.train.consistency_weight!r} needs "
            f"model.embedding_channels > 0, got {config.model.embedding_channels!r}"
        )
    for key, value in config.flat().items():  # configs are saved with every run: no secret may be in one
        if isinstance(value, str) and has_userinfo(value):
            raise ConfigError(
                f"{source}: {key}={redact(value)} holds credentials; they belong in the "
                "environment (AWS_* keys, MLFLOW_TRACKING_USERNAME/_PASSWORD or _TOKEN)"
            )
    for key, value in (("data.uri", config.data.uri), ("run.storage", config.run.storage)):
        try:
            parse_location(value, key)
        except LocationError as error:
            raise ConfigError(f"{source}: {error}") from None
    _check_outputs_outside_data(config, source)
    pretrained = config.model.pretrained or ""
    if "://" in pretrained:
        try:
            parse_location(pretrained, "model.pretrained")
        except LocationError as error:
            raise ConfigError(
                f"{source}: {error} (weights: a local file, s3://bucket/key, imagenet, "
                "torchvision:<WEIGHTS> or none)"
            ) from None
    _check_space(config, source)


def _check_outputs_outside_data(config: Config, source: str) -> None:
    """What a run writes (its folder under run.storage, a sqlite tracking file) and the dataset it reads
    never overlap: a published version is immutable, and a checkpoint written into it would change it."""
    data = config.data.uri
    storage = config.run.storage.rstrip("/")
    writes = [
        ("run.storage", config.run.storage, config.run.storage),
        *(
            ("run.storage", config.run.storage, f"{storage}/{name}")
            for name in (config.run.name, config.tune.name)
            if stays_inside(name)
        ),
    ]
    if config.tracking.uri and config.tracking.uri.startswith("sqlite:///"):
        writes.append(("tracking.uri", config.tracking.uri, config.tracking.uri[len("sqlite:///") :]))
    for key, value, written in writes:
        if inside(written, data) or (written != config.run.storage and inside(data, written)):
            raise ConfigError(
                f"{source}: {key}={redact(value)} writes where data.uri={redact(data)} is read "
                "(a run only reads its dataset). Choose another place"
            )


def _check_model(model: ModelConfig, source: str) -> None:
    """The model name and options, checked by the model library itself before anything runs."""
    from ccnet import list_models  # lazy: torch (the model library) loads only when a model config is checked

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
        ((kind, values),) = spec.items()
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
                validate(build(Config, values_dict, "", source), source)
            except ConfigError as error:
                raise ConfigError(f"{where}: the value {value!r} is refused ({error})") from None
