"""Ablations: named model variants crossed with seeds, run as a Ray Tune grid, summarised per variant.

A config's ``tune.variants`` names sets of overrides (``{"fcn": ["model.recurrence=0"], "cc_r2": []}``) and
``tune.seeds`` the seeds; :mod:`pipeline.train.tune` trains every variant once per seed with no early stopping
(``tune.scheduler: none``). This module owns what is specific to that: the variants' configs (checked before
anything starts), their cost at the input size (parameters, GFLOPs of the model and of its attention alone),
and the summary of the trials' results, one row per variant with the mean and spread over the seeds, as
markdown, CSV and a chart (:func:`pipeline.eval.plots.ablation_figure`).

    ccnet tune -c configs/ablation_ccnet-tiny_generated-256x256_cpu.yaml
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ccnet import build_ccnet
from pipeline.config import Config, ConfigError, apply_overrides, config_from_dict

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The metrics a trial reports at its end (pipeline.train.tune) that the table summarises.
SINGLE = "final/mIoU_ss"
MULTI = "final/mIoU_ms_flip"
IMAGES_PER_SECOND = "train/median_images_per_second"
PEAK_MEMORY = "train/peak_memory_mib"
# Modules whose FLOPs count as "attention" (``FlopCounterMode`` names them from the model's class).
_ATTENTION_MODULES = ("CCNet.head.attention", "CCNet.stem_attention")


def variant_configs(config: Config) -> dict[str, Config]:
    """Each variant's config: ``config`` with the variant's overrides, checked like a file.

    Raises:
        ConfigError: a variant name that cannot name a run, or an override that is malformed, unknown or
            impossible; the message names ``tune.variants.<name>``.
    """
    configs = {}
    for name, overrides in config.tune.variants.items():
        source = f"tune.variants.{name}"
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{source}: a variant name is letters, digits, '_', '.' or '-'")
        values = apply_overrides(config.to_dict(), list(overrides), source=source)
        values["tune"]["variants"] = {}  # a variant's own config is not an ablation
        configs[name] = config_from_dict(values, source=source)
    return configs


@dataclass(frozen=True)
class VariantCost:
    """What a variant costs at one input size; FLOPs of one forward pass (2 per multiply-add)."""

    params: int
    gflops: float
    attention_gflops: float


def variant_cost(config: Config, num_classes: int, image_size: tuple[int, int]) -> VariantCost:
    """Parameters and forward GFLOPs of ``config``'s model on one ``image_size`` image, counted on the meta
    device (nothing allocated, no weights loaded); "attention" is the stem and head attention modules."""
    overrides = config.model.overrides()
    overrides.pop("pretrained", None)
    with torch.device("meta"):
        model = build_ccnet(config.model.name, num_classes, **overrides)
    image = torch.empty(1, 3, *image_size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    per_module = counter.get_flop_counts()
    attention = sum(sum(per_module.get(name, {}).values()) for name in _ATTENTION_MODULES)
    params = sum(p.numel() for p in model.parameters())
    return VariantCost(params, counter.get_total_flops() / 1e9, attention / 1e9)


@dataclass(frozen=True)
class Trial:
    """One finished (or failed) trial of the grid: its variant, seed and end-of-run metrics."""

    variant: str
    seed: int
    metrics: dict[str, float]
    error: str | None = None


@dataclass(frozen=True)
class Stat:
    """Mean and spread (sample standard deviation; 0 for one value) over the seeds; n values."""

    mean: float
    spread: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return None
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), spread, len(values))


@dataclass(frozen=True)
class VariantRow:
    """One row of the ablation table."""

    variant: str
    cost: VariantCost
    single: Stat | None
    multi: Stat | None
    images_per_second: Stat | None
    peak_memory_mib: Stat | None
    seeds: tuple[int, ...]
    failed: tuple[int, ...]  # seeds whose trial failed or diverged


def summarise(trials: Sequence[Trial], costs: dict[str, VariantCost]) -> list[VariantRow]:
    """One row per variant (in ``costs``' order): the mean and spread over its seeds' trials."""
    rows = []
    for variant, cost in costs.items():
        mine = [t for t in trials if t.variant == variant]
        done = [t for t in mine if t.error is None]

        def stat(key: str, done: list[Trial] = done) -> Stat | None:
            return Stat.of([t.metrics.get(key, math.nan) for t in done])

        rows.append(VariantRow(
            variant, cost, stat(SINGLE), stat(MULTI), stat(IMAGES_PER_SECOND), stat(PEAK_MEMORY),
            seeds=tuple(sorted(t.seed for t in mine)),
            failed=tuple(sorted(t.seed for t in mine if t.error is not None)),
        ))
    return rows


def _pct(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    if stat.n == 1:  # one seed has no spread to show
        return f"{100 * stat.mean:.2f}"
    return f"{100 * stat.mean:.2f} ± {100 * stat.spread:.2f}"


def _num(stat: Stat | None, digits: int) -> str:
    return "-" if stat is None else f"{stat.mean:.{digits}f}"


def results_table(rows: Sequence[VariantRow]) -> str:
    """The table as markdown: mIoU in % as mean ± standard deviation over the seeds (the mean alone for one
    seed)."""
    lines = [
        "| variant | val mIoU single (%) | val mIoU ms+flip (%) | params (M) | GFLOPs | attention GFLOPs "
        "| train img/s | peak memory (MiB) | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        seeds = ",".join(map(str, row.seeds)) or "-"
        if row.failed:
            seeds += f" (failed: {','.join(map(str, row.failed))})"
        lines.append(
            f"| {row.variant} | {_pct(row.single)} | {_pct(row.multi)} | {row.cost.params / 1e6:.3f} "
            f"| {row.cost.gflops:.2f} | {row.cost.attention_gflops:.3f} | {_num(row.images_per_second, 1)} "
            f"| {_num(row.peak_memory_mib, 0)} | {seeds} |"
        )
    return "\n".join(lines)


def results_csv(rows: Sequence[VariantRow]) -> str:
    """The table as CSV, unrounded: mIoU as fractions, mean and std columns side by side."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    stats = ("miou_single", "miou_multi_flip", "images_per_second", "peak_memory_mib")
    writer.writerow([
        "variant", *(f"{name}_{part}" for name in stats for part in ("mean", "std")), "params", "gflops",
        "attention_gflops", "seeds", "failed_seeds",
    ])
    for row in rows:
        values: list[Any] = [row.variant]
        for stat in (row.single, row.multi, row.images_per_second, row.peak_memory_mib):
            values += ["", ""] if stat is None else [stat.mean, stat.spread]
        values += [row.cost.params, row.cost.gflops, row.cost.attention_gflops,
                   " ".join(map(str, row.seeds)), " ".join(map(str, row.failed))]
        writer.writerow(values)
    return buffer.getvalue()
