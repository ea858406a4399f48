"""Ablations: named model variants crossed with seeds, run as a Ray Tune grid, summarised per variant.

A config's ``tune.variants`` names sets of overrides (``{"fcn": ["model.recurrence=0"], "cc_r2": []}``) and
``tune.seeds`` the seeds; :mod:`pipeline.train.tune` trains every variant once per seed with no early stopping
(``tune.scheduler: none``). This module owns what is specific to that: the variants' configs (checked before
anything starts), their cost at the input size (parameters, GFLOPs of the model and of its attention alone),
and the summary of the trials' results, one row per variant with the mean over the seeds and its 95 %
confidence interval (Student's t, :mod:`pipeline.eval.intervals`), the attention's ``gamma`` and share at the
end (:mod:`ccnet.diagnostics`) and the wall time per run, as markdown, CSV and a chart
(:func:`pipeline.eval.plots.ablation_figure`); and each class's IoU per variant (:func:`class_table`), where
thin classes show what a mean hides.
With ``tune.baseline`` each other variant is also compared with the baseline seed by seed: the paired
difference, its 95 % interval and a verdict that names a difference only when its interval excludes 0
("not resolved" otherwise). Without it nothing is compared, even with a variant named ``fcn``.

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
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode

from ccnet import build_ccnet
from pipeline.config import Config, ConfigError, apply_overrides, config_from_dict
from pipeline.eval.intervals import Stat
from pipeline.eval.plots import ablation_figure
from pipeline.eval.results import (
    FINAL_MIOU_MS,
    FINAL_MIOU_SS,
    MULTI_SCALE,
    PROTOCOL_SUFFIX,
    SINGLE_SCALE,
    class_keys,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The metrics a trial reports at its end (pipeline.train.tune) that the table summarises.
VARIANT = "variant"  # a search's grid axis over tune.variants (pipeline.train.tune)
SINGLE = FINAL_MIOU_SS
MULTI = FINAL_MIOU_MS
IMAGES_PER_SECOND = "train/median_images_per_second"
PEAK_MEMORY = "train/peak_memory_mib"
WALL = "run/seconds"  # a trial's seconds as if uninterrupted: training, final evaluation and logging
TUNE_WALL = "time_total_s"  # Ray Tune's: the trial's last start alone (what a trial reported before WALL)
# The attention at the last validation (ccnet.diagnostics), per place: the head's, else the stem's.
PLACES = ("head", "stem")
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
        values["tune"]["baseline"] = None
        configs[name] = config_from_dict(values, source=source)
    return configs


@dataclass(frozen=True)
class VariantCost:
    """What a variant costs at one input size; FLOPs of one forward pass (2 per multiply-add)."""

    params: int
    gflops: float
    attention_gflops: float


def variant_costs(variants: dict[str, Config], num_classes: int, crop_size: int) -> dict[str, VariantCost]:
    """:func:`variant_cost` of every variant on one ``crop_size`` square image (the search's crop)."""
    return {name: variant_cost(c, num_classes, (crop_size, crop_size)) for name, c in variants.items()}


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
    """One trial of the grid: its variant, seed and latest metrics; it finished when it reported its final
    evaluation (an interrupted grid's trial stopped before it, and a failed one has an error)."""

    variant: str
    seed: int
    metrics: dict[str, float]
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.error is None and SINGLE in self.metrics


def paired_difference(variant: Sequence[Trial], baseline: Sequence[Trial], key: str) -> Stat | None:
    """``key`` of ``variant`` minus that of ``baseline``, seed by seed over the seeds both finished with a
    value (ascending): the mean difference, its 95 % interval and n, the number of pairs; None for no pair.
    A seed with several finished trials (a space sampled as well) counts once, at their mean."""
    mine, theirs = _per_seed(variant, key), _per_seed(baseline, key)
    return Stat.of([mine[seed] - theirs[seed] for seed in sorted(mine.keys() & theirs.keys())])


def _per_seed(trials: Sequence[Trial], key: str) -> dict[int, float]:
    """Each seed's ``key`` over its finished trials (their mean); a seed with no value for it is left out."""
    values: dict[int, list[float]] = {}
    for trial in trials:
        value = trial.metrics.get(key, math.nan)
        if trial.finished and value is not None and not math.isnan(value):
            values.setdefault(trial.seed, []).append(value)
    return {seed: statistics.fmean(seed_values) for seed, seed_values in values.items()}


def verdict(difference: Stat | None, baseline: str) -> str:
    """What a paired difference says: "better than <baseline>" or "worse than <baseline>" when its 95 %
    interval excludes 0, else "not resolved" (an interval holding 0, or fewer than two pairs: no interval)."""
    interval = None if difference is None else difference.interval
    if interval is None or interval[0] <= 0.0 <= interval[1]:
        return "not resolved"
    return f"{'better' if interval[0] > 0.0 else 'worse'} than {baseline}"


@dataclass(frozen=True)
class VariantRow:
    """One row of the ablation table; the differences are to the baseline (None for the baseline itself,
    without one, or without a pair)."""

    variant: str
    cost: VariantCost
    single: Stat | None
    multi: Stat | None
    images_per_second: Stat | None
    peak_memory_mib: Stat | None
    seeds: tuple[int, ...]
    failed: tuple[int, ...]  # seeds whose trial failed or diverged
    finished: int  # trials that finished (one per seed unless a space is sampled as well)
    unfinished: tuple[int, ...] = ()  # seeds stopped before their final evaluation (an interrupted grid)
    delta_single: Stat | None = None
    delta_multi: Stat | None = None
    gamma: Stat | None = None  # the attention's at the end, at its first place in PLACES present
    share: Stat | None = None
    place: str | None = None
    wall_seconds: Stat | None = None


def summarise(
    trials: Sequence[Trial], costs: dict[str, VariantCost], baseline: str | None = None
) -> list[VariantRow]:
    """One row per variant (in ``costs``' order): the mean and 95 % interval over its finished trials and,
    with ``baseline`` (a name in ``costs``), every other variant's paired differences to it."""
    reference = [t for t in trials if t.variant == baseline]
    rows = []
    for variant, cost in costs.items():
        mine = [t for t in trials if t.variant == variant]
        done = [t for t in mine if t.finished]

        def stat(key: str, done: list[Trial] = done) -> Stat | None:
            return Stat.of([t.metrics.get(key, math.nan) for t in done])

        paired = baseline is not None and variant != baseline
        place = next((p for p in PLACES if any(f"attention/{p}/share" in t.metrics for t in done)), None)
        rows.append(
            VariantRow(
                variant,
                cost,
                stat(SINGLE),
                stat(MULTI),
                stat(IMAGES_PER_SECOND),
                stat(PEAK_MEMORY),
                seeds=tuple(sorted(t.seed for t in mine)),
                failed=tuple(sorted(t.seed for t in mine if t.error is not None)),
                finished=len(done),
                unfinished=tuple(sorted(t.seed for t in mine if t.error is None and not t.finished)),
                delta_single=paired_difference(mine, reference, SINGLE) if paired else None,
                delta_multi=paired_difference(mine, reference, MULTI) if paired else None,
                gamma=stat(f"attention/{place}/gamma") if place else None,
                share=stat(f"attention/{place}/share") if place else None,
                place=place,
                wall_seconds=Stat.of([t.metrics.get(WALL, t.metrics.get(TUNE_WALL, math.nan)) for t in done]),
            )
        )
    return rows


def _pct(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    if stat.half_width is None:  # one seed has no interval to show
        return f"{100 * stat.mean:.2f}"
    return f"{100 * stat.mean:.2f} ± {100 * stat.half_width:.2f}"


def _delta(stat: Stat | None) -> str:
    """A difference in percentage points with its interval's bounds: ``+2.00 [+0.76, +3.24]``."""
    if stat is None:
        return "-"
    if stat.interval is None:
        return f"{100 * stat.mean:+.2f} [one pair]"
    low, high = stat.interval
    return f"{100 * stat.mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def _paired_cells(row: VariantRow, baseline: str) -> list[str]:
    """pairs (single/ms+flip where the two differ), Δ single, Δ ms+flip, verdict (one, or one per protocol
    where they differ)."""
    if row.variant == baseline:
        return ["-", "-", "-", "baseline"]
    single_n, multi_n = (0 if d is None else d.n for d in (row.delta_single, row.delta_multi))
    pairs = str(single_n) if single_n == multi_n else f"{single_n}/{multi_n}"
    single, multi = verdict(row.delta_single, baseline), verdict(row.delta_multi, baseline)
    said = single if single == multi else f"single: {single}; ms+flip: {multi}"
    return [pairs, _delta(row.delta_single), _delta(row.delta_multi), said]


def _attention(row: VariantRow) -> str:
    """``head 0.123 / 0.081``: the place, then the mean over seeds of gamma and of the share at the end."""
    if row.place is None or row.gamma is None or row.share is None:
        return "-"
    return f"{row.place} {row.gamma.mean:.3f} / {row.share.mean:.3f}"


def _num(stat: Stat | None, digits: int) -> str:
    return "-" if stat is None else f"{stat.mean:.{digits}f}"


def results_table(rows: Sequence[VariantRow], baseline: str | None = None) -> str:
    """The table as markdown: n finished trials, mIoU in % as mean ± the half-width of its 95 % interval (the
    mean alone for one seed) and the costs; with ``baseline``, also each other variant's paired differences
    in percentage points with the interval's bounds, the number of pairs and the verdict."""
    header = "| variant | n | val mIoU single (%, ± 95 % CI) | val mIoU ms+flip (%, ± 95 % CI) |"
    align = "|---|---:|---:|---:|"
    if baseline is not None:
        header += (
            f" pairs | Δ single vs {baseline} (pp, 95 % CI) | Δ ms+flip vs {baseline} (pp, 95 % CI) "
            "| verdict |"
        )
        align += "---:|---:|---:|---|"
    header += (
        " attention at the end: γ / share | params (M) | GFLOPs | attention GFLOPs | train img/s | "
        "wall per run (min) | peak memory (MiB) | seeds |"
    )
    align += "---|---:|---:|---:|---:|---:|---:|---|"
    lines = [header, align]
    for row in rows:
        seeds = ",".join(map(str, row.seeds)) or "-"
        if row.failed:
            seeds += f" (failed: {','.join(map(str, row.failed))})"
        if row.unfinished:
            seeds += f" (unfinished: {','.join(map(str, row.unfinished))})"
        cells = [row.variant, str(row.finished), _pct(row.single), _pct(row.multi)]
        if baseline is not None:
            cells += _paired_cells(row, baseline)
        cost = row.cost
        wall = "-" if row.wall_seconds is None else f"{row.wall_seconds.mean / 60:.1f}"
        cells += [
            _attention(row),
            f"{cost.params / 1e6:.3f}",
            f"{cost.gflops:.2f}",
            f"{cost.attention_gflops:.3f}",
            _num(row.images_per_second, 1),
            wall,
            _num(row.peak_memory_mib, 0),
            seeds,
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def results_csv(rows: Sequence[VariantRow], baseline: str | None = None) -> str:
    """The table as CSV, unrounded: mIoU and its differences as fractions; each statistic's mean and the
    half-width of its 95 % interval (empty for one value); with ``baseline``, per protocol the pairs, the
    mean paired difference, its interval's bounds (empty for one pair) and the verdict."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    stats = (
        "miou_single",
        "miou_multi_flip",
        "images_per_second",
        "peak_memory_mib",
        "gamma",
        "share",
        "wall_seconds",
    )
    header = [
        "variant",
        "n",
        *(f"{name}_{part}" for name in stats for part in ("mean", "ci95")),
        "attention_place",
        "params",
        "gflops",
        "attention_gflops",
    ]
    if baseline is not None:
        parts = ("pairs", "mean", "low", "high", "verdict")
        header += [f"{name}_{part}" for name in ("delta_single", "delta_multi_flip") for part in parts]
    writer.writerow([*header, "seeds", "failed_seeds", "unfinished_seeds"])
    for row in rows:
        values: list[Any] = [row.variant, row.finished]
        for stat in (
            row.single,
            row.multi,
            row.images_per_second,
            row.peak_memory_mib,
            row.gamma,
            row.share,
            row.wall_seconds,
        ):
            values += ["", ""] if stat is None else [stat.mean, _blank(stat.half_width)]
        values += [row.place or "", row.cost.params, row.cost.gflops, row.cost.attention_gflops]
        if baseline is not None:
            values += [
                *_delta_fields(row, row.delta_single, baseline),
                *_delta_fields(row, row.delta_multi, baseline),
            ]
        values += [" ".join(map(str, seeds)) for seeds in (row.seeds, row.failed, row.unfinished)]
        writer.writerow(values)
    return buffer.getvalue()


def _blank(value: float | None) -> float | str:
    return "" if value is None else value


def _delta_fields(row: VariantRow, delta: Stat | None, baseline: str) -> list[Any]:
    """One paired difference as CSV fields: pairs, mean, low, high, verdict ("baseline" on its own row)."""
    if row.variant == baseline:
        return ["", "", "", "", "baseline"]
    if delta is None:
        return [0, "", "", "", verdict(delta, baseline)]
    low, high = delta.interval or (None, None)
    return [delta.n, delta.mean, _blank(low), _blank(high), verdict(delta, baseline)]


def class_table(
    trials: Sequence[Trial], variants: Sequence[str], classes: Sequence[str], baseline: str | None = None
) -> str:
    """Each class's val IoU per variant as markdown: in % the mean over the variant's finished trials,
    single-scale / ms+flip, and with ``baseline`` the paired single-scale difference to it in points
    (``12.3 / 14.0 (+1.2)``)."""
    keys = class_keys(classes)
    lines = [f"| variant | n | {' | '.join(classes)} |", "|---|---:|" + "---:|" * len(classes)]
    reference = [t for t in trials if t.variant == baseline]
    for variant in variants:
        mine = [t for t in trials if t.variant == variant and t.finished]
        cells = [variant, str(len(mine))]
        for key in keys:
            single, multi = (
                Stat.of([t.metrics.get(f"final/IoU_{PROTOCOL_SUFFIX[p]}/{key}", math.nan) for t in mine])
                for p in (SINGLE_SCALE, MULTI_SCALE)
            )
            cell = " / ".join("-" if stat is None else f"{100 * stat.mean:.1f}" for stat in (single, multi))
            delta = paired_difference(mine, reference, f"final/IoU_ss/{key}") if reference else None
            if variant != baseline and delta is not None:
                cell += f" ({100 * delta.mean:+.1f})"
            cells.append(cell)
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def results_figure(rows: Sequence[VariantRow], baseline: str | None = None, title: str = "") -> Figure:
    """The table as a chart (:func:`pipeline.eval.plots.ablation_figure`): mIoU with its 95 % intervals,
    with ``baseline`` the paired differences to it with theirs, and the attention's cost."""

    def series(stats: Sequence[Stat | None]) -> tuple[list[float], list[float]]:
        """Means and half-widths, NaN where there is none (no result; one value has no interval)."""
        means = [math.nan if s is None else s.mean for s in stats]
        return means, [math.nan if s is None or s.half_width is None else s.half_width for s in stats]

    miou = {"single-scale": series([r.single for r in rows]), "ms+flip": series([r.multi for r in rows])}
    differences = None
    if baseline is not None:
        differences = {
            "single-scale": series([r.delta_single for r in rows]),
            "ms+flip": series([r.delta_multi for r in rows]),
        }
    return ablation_figure(
        [r.variant for r in rows],
        miou,
        [r.cost.attention_gflops for r in rows],
        title=title,
        differences=differences,
        baseline=baseline,
    )
