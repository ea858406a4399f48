"""Ablation summaries: variants checked up front, costs counted, one row per variant over its seeds."""

from __future__ import annotations

import csv
import io
import math
import statistics
from typing import Any

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.eval import intervals
from pipeline.eval.plots import ablation_figure
from pipeline.train import ablation

VARIANTS = (
    "tune.variants={fcn: [model.recurrence=0], cc_r2: [model.recurrence=2], "
    "axial_r1: [model.attention=axial, model.recurrence=1], stem_cc_r2: [model.placement=stem]}"
)


def _config(*overrides: str):
    return load_config(None, ["model.name=ccnet_tiny", VARIANTS, *overrides])


def test_variant_configs_apply_each_variants_overrides_to_the_base() -> None:
    configs = ablation.variant_configs(_config("train.lr=0.02"))
    assert list(configs) == ["fcn", "cc_r2", "axial_r1", "stem_cc_r2"]
    assert configs["fcn"].model.recurrence == 0
    assert (configs["axial_r1"].model.attention, configs["axial_r1"].model.recurrence) == ("axial", 1)
    assert configs["stem_cc_r2"].model.placement == "stem"
    assert all(c.train.lr == 0.02 and not c.tune.variants for c in configs.values())


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ("{fcn: [model.recurence=0]}", "tune.variants.fcn: unknown key model.recurence"),
        ("{fcn: [model.recurrence=-1]}", "tune.variants.fcn: model.recurrence=-1 is not allowed"),
        ("{fcn: [recurrence=0]}", "tune.variants.fcn: expected section.key=value"),
        ("{'a/b': []}", "tune.variants.a/b: a variant name is"),
    ],
)
def test_a_bad_variant_is_refused_naming_it(variants: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        ablation.variant_configs(load_config(None, [f"tune.variants={variants}"]))


def test_costs_count_the_attention_alone() -> None:
    configs = ablation.variant_configs(_config())
    costs = {name: ablation.variant_cost(c, 6, (64, 64)) for name, c in configs.items()}
    assert costs["fcn"].attention_gflops == 0.0
    # Every variant is the FCN plus its attention modules (in the head, or at the stem only): the difference
    # in model FLOPs is what the attention alone is counted at.
    for name in ("cc_r2", "axial_r1", "stem_cc_r2"):
        assert costs[name].attention_gflops > 0.0
        assert costs[name].gflops - costs["fcn"].gflops == pytest.approx(costs[name].attention_gflops)
        assert costs["fcn"].params < costs[name].params


def _trial(variant: str, seed: int, single: float, multi: float, error: str | None = None) -> ablation.Trial:
    metrics = {
        ablation.SINGLE: single,
        ablation.MULTI: multi,
        ablation.IMAGES_PER_SECOND: 10.0 + seed,
        ablation.PEAK_MEMORY: 500.0,
    }
    return ablation.Trial(variant, seed, metrics, error)


def test_rows_hold_the_mean_and_95_interval_over_seeds_and_name_failed_seeds() -> None:
    cost = ablation.VariantCost(1000, 1.0, 0.1)
    trials = [
        _trial("cc", 0, 0.80, 0.82),
        _trial("cc", 1, 0.90, 0.92),
        _trial("cc", 2, 0.0, 0.0, error="diverged"),
        _trial("fcn", 0, 0.60, 0.61),
    ]
    rows = ablation.summarise(trials, {"fcn": cost, "cc": cost, "never_ran": cost})
    assert [r.variant for r in rows] == ["fcn", "cc", "never_ran"]
    fcn, cc, never = rows
    # cc: mean 0.85, sd sqrt(0.005), so sd / sqrt(2) = 0.05 and the half-width t_{0.975,1} * 0.05 = 0.63531.
    assert cc.single.mean == pytest.approx(0.85) and cc.single.half_width == pytest.approx(12.706205 * 0.05)
    assert cc.single.n == 2 and cc.finished == 2 and cc.seeds == (0, 1, 2) and cc.failed == (2,)
    assert fcn.single.half_width is None and fcn.single.interval is None and never.single is None
    assert all(r.delta_single is None and r.delta_multi is None for r in rows)  # no baseline, no pairs

    table = ablation.results_table(rows).splitlines()
    assert len(table) == 2 + 3
    assert "verdict" not in table[0] and "Δ" not in table[0]
    assert table[2].startswith("| fcn | 1 | 60.00 | 61.00 |")  # one seed: no interval to show
    assert table[3].startswith("| cc | 2 | 85.00 ± 63.53 | 87.00 ± 63.53 |")
    assert table[3].endswith("| 0,1,2 (failed: 2) |")
    assert table[4].startswith("| never_ran | 0 | - | - |")

    parsed = list(csv.DictReader(io.StringIO(ablation.results_csv(rows))))
    assert [p["variant"] for p in parsed] == ["fcn", "cc", "never_ran"]
    assert float(parsed[1]["miou_single_mean"]) == pytest.approx(0.85)
    assert float(parsed[1]["miou_single_ci95"]) == pytest.approx(0.635310, abs=1e-6)
    assert parsed[0]["miou_single_ci95"] == "" and "delta_single_mean" not in parsed[0]
    assert parsed[1]["failed_seeds"] == "2" and parsed[2]["miou_single_mean"] == ""


def test_a_trial_stopped_before_its_final_evaluation_is_named_and_not_counted() -> None:
    # An interrupted grid: seed 2 of each variant stopped at a validation, before its final evaluation; its
    # last val mIoU, gamma and wall time are not an end-of-run result and must not enter the row or a pair.
    cost = ablation.VariantCost(1000, 1.0, 0.1)
    stopped = {"val/mIoU": 0.5, "attention/head/gamma": 9.0, ablation.WALL: 99.0}
    trials = [
        *_grid({0: 0.62, 1: 0.64}, {0: 0.60, 1: 0.61}),
        ablation.Trial("cc", 2, {**stopped, "attention/head/share": 0.9}),
        ablation.Trial("fcn", 2, stopped),
    ]
    fcn, cc = ablation.summarise(trials, {"fcn": cost, "cc": cost}, baseline="fcn")
    assert (cc.finished, cc.seeds, cc.unfinished, cc.failed) == (2, (0, 1, 2), (2,), ())
    assert cc.single.n == 2 and cc.single.mean == pytest.approx(0.63)
    assert cc.delta_single.n == 2 and cc.delta_single.mean == pytest.approx(0.025)
    assert cc.place is None and cc.gamma is None and cc.wall_seconds is None
    assert fcn.finished == 2 and fcn.unfinished == (2,)
    table = ablation.results_table([fcn, cc], baseline="fcn").splitlines()
    assert table[3].startswith("| cc | 2 | 63.00 ± ") and table[3].endswith("| 0,1,2 (unfinished: 2) |")
    parsed = list(csv.DictReader(io.StringIO(ablation.results_csv([fcn, cc], baseline="fcn"))))
    assert (parsed[1]["n"], parsed[1]["unfinished_seeds"], parsed[1]["failed_seeds"]) == ("2", "2", "")


def test_the_class_table_holds_each_class_per_variant_with_the_paired_difference() -> None:
    def trial(variant: str, seed: int, pole: float, sky: float, finished: bool = True) -> ablation.Trial:
        metrics = {"final/IoU_ss/Pole": pole, "final/IoU_ms_flip/Pole": pole + 0.01, "final/IoU_ss/Sky": sky}
        return ablation.Trial(variant, seed, {**metrics, **({ablation.SINGLE: 0.5} if finished else {})})

    trials = [
        trial("fcn", 0, 0.00, 0.90),
        trial("fcn", 1, 0.02, 0.92),
        trial("cc", 0, 0.10, 0.91),
        trial("cc", 1, 0.14, 0.91),
        trial("cc", 2, 0.99, 0.99, finished=False),  # an interrupted trial counts nowhere
    ]
    table = ablation.class_table(trials, ["fcn", "cc", "never_ran"], ["Pole", "Sky"], baseline="fcn")
    lines = table.splitlines()
    assert lines[0] == "| variant | n | Pole | Sky |"
    # Pole: fcn 1.0 ss / 2.0 ms+flip; cc 12.0 / 13.0, paired differences 10 and 12 points: +11.0. Sky has no
    # ms+flip figure here: "-".
    assert lines[2] == "| fcn | 2 | 1.0 / 2.0 | 91.0 / - |"
    assert lines[3] == "| cc | 2 | 12.0 / 13.0 (+11.0) | 91.0 / - (+0.0) |"
    assert lines[4] == "| never_ran | 0 | - / - | - / - |"
    assert "(+" not in ablation.class_table(trials, ["cc"], ["Pole"])  # no baseline, no differences


def test_class_keys_are_the_metric_names_with_collisions_numbered() -> None:
    from pipeline.eval.results import EvalResult, class_keys

    names = ("traffic light", "traffic_light", "sky")
    assert class_keys(names) == ["traffic_light", "traffic_light_1", "sky"]
    metrics = EvalResult(torch.eye(3, dtype=torch.int64), names).as_metrics("val")
    assert [key for key in metrics if key.startswith("val/IoU/")] == [
        f"val/IoU/{k}" for k in class_keys(names)
    ]


# Two-sided 95 % quantiles t_{0.975, df} as printed in statistics tables.
@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)]
)
def test_the_t_quantile_matches_the_printed_tables(df: int, expected: float) -> None:
    assert intervals.student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("p", [0.6, 0.75, 0.9, 0.975, 0.999, 0.9999])
def test_the_t_quantile_matches_the_closed_forms_and_the_normal_limit(p: float) -> None:
    # df = 1 is the Cauchy distribution, df = 2 has a closed form; as df grows, t tends to the normal.
    assert intervals.student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    two = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    assert intervals.student_t_quantile(p, 2) == pytest.approx(two, rel=1e-9)
    assert intervals.student_t_quantile(p, 1e7) == pytest.approx(statistics.NormalDist().inv_cdf(p), rel=1e-5)
    assert intervals.student_t_quantile(1 - p, 3) == -intervals.student_t_quantile(p, 3)


@pytest.mark.parametrize(("p", "df"), [(0.0, 3), (1.0, 3), (0.975, 0), (0.975, math.inf), (math.nan, 3)])
def test_the_t_quantile_refuses_impossible_arguments(p: float, df: float) -> None:
    with pytest.raises(ValueError, match="a t quantile needs"):
        intervals.student_t_quantile(p, df)


def _grid(
    variant: dict[int, float], baseline: dict[int, float], multi_shift: float = 0.0
) -> list[ablation.Trial]:
    """Trials of "cc" and "fcn" with these single-scale mIoU per seed (ms+flip: that + ``multi_shift``)."""
    return [
        *(_trial("cc", seed, value, value + multi_shift) for seed, value in variant.items()),
        *(_trial("fcn", seed, value, value) for seed, value in baseline.items()),
    ]


def test_a_paired_difference_whose_interval_excludes_zero_is_better_by_hand() -> None:
    # Differences per seed 0.020, 0.015, 0.025: mean 0.020, sd 0.005; half-width t_{0.975,2} * sd / sqrt(3)
    # = 4.302653 * 0.005 / 1.7320508 = 0.0124207, so the interval [0.0075793, 0.0324207] excludes 0.
    # ms+flip: 0.04 lower per seed, differences -0.020, -0.025, -0.015: the interval mirrored, all below 0.
    trials = _grid({0: 0.620, 1: 0.625, 2: 0.615}, {0: 0.600, 1: 0.610, 2: 0.590}, multi_shift=-0.04)
    cost = ablation.VariantCost(1000, 1.0, 0.1)
    fcn, cc = ablation.summarise(trials, {"fcn": cost, "cc": cost}, baseline="fcn")
    assert fcn.delta_single is None and fcn.delta_multi is None
    assert (cc.delta_single.mean, cc.delta_single.n) == (pytest.approx(0.020), 3)
    assert cc.delta_single.interval == pytest.approx((0.0075793, 0.0324207), abs=1e-7)
    assert cc.delta_multi.interval == pytest.approx((-0.0324207, -0.0075793), abs=1e-7)
    assert ablation.verdict(cc.delta_single, "fcn") == "better than fcn"
    assert ablation.verdict(cc.delta_multi, "fcn") == "worse than fcn"

    table = ablation.results_table([fcn, cc], baseline="fcn").splitlines()
    assert "| pairs | Δ single vs fcn (pp, 95 % CI) | Δ ms+flip vs fcn (pp, 95 % CI) | verdict |" in table[0]
    assert "| fcn | 3 | 60.00 ± 2.48 | 60.00 ± 2.48 | - | - | - | baseline |" in table[2]
    assert (
        "| cc | 3 | 62.00 ± 1.24 | 58.00 ± 1.24 | 3 | +2.00 [+0.76, +3.24] | -2.00 [-3.24, -0.76] "
        "| single: better than fcn; ms+flip: worse than fcn |"
    ) in table[3]
    assert table[3].endswith("| 0,1,2 |")

    fcn_csv, cc_csv = csv.DictReader(io.StringIO(ablation.results_csv([fcn, cc], baseline="fcn")))
    assert (fcn_csv["delta_single_mean"], fcn_csv["delta_single_verdict"]) == ("", "baseline")
    assert cc_csv["delta_single_pairs"] == "3" and float(cc_csv["delta_single_mean"]) == pytest.approx(0.02)
    assert float(cc_csv["delta_single_low"]) == pytest.approx(0.0075793, abs=1e-7)
    assert float(cc_csv["delta_single_high"]) == pytest.approx(0.0324207, abs=1e-7)
    assert (cc_csv["delta_single_verdict"], cc_csv["delta_multi_flip_verdict"]) == (
        "better than fcn",
        "worse than fcn",
    )


def test_an_interval_holding_zero_or_a_single_pair_is_not_resolved() -> None:
    cost = ablation.VariantCost(1000, 1.0, 0.1)
    # Differences 0.01, -0.01, 0.02: mean 0.00667, sd 0.01528, half-width 4.3027 * 0.01528 / sqrt(3) = 0.0379:
    # the interval [-0.0313, 0.0446] holds 0, though the variant's mean is the higher one.
    trials = _grid({0: 0.61, 1: 0.60, 2: 0.62}, {0: 0.60, 1: 0.61, 2: 0.60})
    _, cc = ablation.summarise(trials, {"fcn": cost, "cc": cost}, baseline="fcn")
    assert cc.delta_single.interval == pytest.approx((-0.031279, 0.044612), abs=1e-6)
    assert ablation.verdict(cc.delta_single, "fcn") == "not resolved"
    assert "| not resolved |" in ablation.results_table([_, cc], baseline="fcn")
    # One common seed: a difference of +0.05 but no interval, so no verdict either.
    rows = ablation.summarise(_grid({0: 0.65}, {0: 0.60}), {"fcn": cost, "cc": cost}, baseline="fcn")
    assert rows[1].delta_single.n == 1 and rows[1].delta_single.interval is None
    assert (
        "| cc | 1 | 65.00 | 65.00 | 1 | +5.00 [one pair] | +5.00 [one pair] | not resolved |"
        in ablation.results_table(rows, baseline="fcn")
    )
    parsed = list(csv.DictReader(io.StringIO(ablation.results_csv(rows, baseline="fcn"))))
    assert (parsed[1]["delta_single_low"], parsed[1]["delta_single_verdict"]) == ("", "not resolved")
    assert ablation.verdict(None, "fcn") == "not resolved"


def test_pairs_are_matched_by_seed_and_only_over_seeds_both_finished() -> None:
    cost = ablation.VariantCost(1000, 1.0, 0.1)
    trials = [
        # cc's seeds listed out of order, seed 3 one the baseline never ran.
        _trial("cc", 3, 0.99, 0.99),
        _trial("cc", 1, 0.70, 0.70),
        _trial("cc", 2, 0.71, 0.71),
        _trial("cc", 0, 0.64, 0.64),
        _trial("fcn", 0, 0.60, 0.60),
        _trial("fcn", 1, 0.66, 0.66),
        _trial("fcn", 2, 0.0, 0.0, error="diverged"),
    ]
    _, cc = ablation.summarise(trials, {"fcn": cost, "cc": cost}, baseline="fcn")
    # Seeds 0 and 1 pair: differences 0.04 and 0.04 (by list position they would be 0.39, 0.04, ...).
    assert cc.delta_single.n == 2 and cc.delta_single.mean == pytest.approx(0.04)
    assert cc.delta_single.half_width == pytest.approx(0.0, abs=1e-12)
    assert cc.single.n == 4  # the variant's own mean still counts all its finished seeds


def test_without_a_baseline_an_fcn_variant_is_not_taken_as_one() -> None:
    cost = ablation.VariantCost(1000, 1.0, 0.1)
    trials = _grid({0: 0.620, 1: 0.625, 2: 0.615}, {0: 0.600, 1: 0.610, 2: 0.590})
    rows = ablation.summarise(trials, {"fcn": cost, "cc": cost})
    assert all(r.delta_single is None for r in rows)
    assert "verdict" not in ablation.results_table(rows) and "verdict" not in ablation.results_csv(rows)


def test_the_baseline_must_name_a_variant() -> None:
    with pytest.raises(
        ConfigError,
        match=r"tune\.baseline='cc_r9' is not allowed \(expected null or one of "
        r"tune\.variants: fcn, cc_r2, axial_r1, stem_cc_r2\)",
    ):
        _config("tune.baseline=cc_r9")
    config = _config("tune.baseline=fcn")
    assert config.tune.baseline == "fcn"
    # Each variant's own config is no ablation, so it names no baseline (and is valid without variants).
    assert all(c.tune.baseline is None for c in ablation.variant_configs(config).values())


def test_the_chart_has_a_bar_per_variant_and_protocol_beside_the_attention_cost() -> None:
    figure = ablation_figure(
        ["fcn", "cc"],
        {"single-scale": ([0.6, 0.8], [0.0, 0.05]), "ms+flip": ([0.62, float("nan")], [0, 0])},
        [0.0, 0.3],
        title="ablation",
    )
    miou_axes, cost_axes = figure.axes
    assert len(miou_axes.patches) == 4 and len(cost_axes.patches) == 2
    assert [t.get_text() for t in cost_axes.get_xticklabels()] == ["fcn", "cc"]
    assert cost_axes.patches[1].get_height() == pytest.approx(0.3)


def _error_bars(container: Any) -> list[tuple[float, float]]:
    """The (low, high) ends of each error bar of a bar or errorbar container, in data units; NaN for a bar
    without one."""
    segments = container.errorbar.lines[2][0] if hasattr(container, "errorbar") else container.lines[2][0]
    return [
        (float(s[0][1]), float(s[1][1])) if len(s) else (math.nan, math.nan) for s in segments.get_segments()
    ]


def test_the_chart_shows_the_intervals_and_the_paired_differences_with_a_line_at_zero() -> None:
    cost = ablation.VariantCost(1000, 1.0, 0.1)
    trials = [
        *_grid({0: 0.620, 1: 0.625, 2: 0.615}, {0: 0.600, 1: 0.610, 2: 0.590}),
        _trial("axial", 0, 0.61, 0.61),
    ]
    rows = ablation.summarise(trials, {"fcn": cost, "cc": cost, "axial": cost}, baseline="fcn")
    figure = ablation.results_figure(rows, "fcn", title="ablation")
    figure.savefig(io.BytesIO(), format="png")  # renders headless on the Agg canvas
    miou_axes, delta_axes, cost_axes = figure.axes

    # cc's single-scale bar: 62.00 ± 1.24 (its seeds 0.620, 0.625, 0.615: sd 0.005, as in the paired case).
    single_bars = miou_axes.containers[0]
    assert _error_bars(single_bars)[1] == pytest.approx((62.0 - 1.24207, 62.0 + 1.24207), abs=1e-4)
    # The differences: one position per variant but the baseline; cc's interval [+0.76, +3.24] pp; axial, one
    # seed, has a marker and no interval.
    assert [t.get_text() for t in delta_axes.get_xticklabels()] == ["cc", "axial"]
    single_deltas = delta_axes.containers[0]
    assert list(single_deltas.lines[0].get_ydata()) == pytest.approx([2.0, 1.0])
    ends = _error_bars(single_deltas)
    assert ends[0] == pytest.approx((0.75793, 3.24207), abs=1e-4) and all(math.isnan(v) for v in ends[1])
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in delta_axes.lines)  # the line at 0
    assert "vs fcn" in delta_axes.get_ylabel()
    assert [t.get_text() for t in cost_axes.get_xticklabels()] == ["fcn", "cc", "axial"]


def test_the_chart_refuses_differences_without_their_baseline() -> None:
    with pytest.raises(ValueError, match="baseline"):
        ablation_figure(
            ["fcn", "cc"],
            {"single-scale": ([0.6, 0.7], [0.0, 0.0])},
            [0.0, 0.1],
            differences={"single-scale": ([math.nan, 0.1], [math.nan, 0.0])},
        )


def test_rows_show_the_attention_at_the_end_and_the_wall_time_per_run() -> None:
    cost = ablation.VariantCost(1000, 1.0, 0.1)
    trials = [
        _trial("fcn", 0, 0.6, 0.6),
        _trial("cc", 0, 0.7, 0.7),
        _trial("cc", 1, 0.7, 0.7),
        _trial("stem", 0, 0.7, 0.7),
    ]
    trials[0].metrics[ablation.WALL] = 600.0
    trials[0].metrics[ablation.TUNE_WALL] = 60.0  # Tune's: the last start alone, for trials run in pieces
    for trial, gamma, share in zip(trials[1:3], (0.2, 0.4), (0.1, 0.3), strict=True):
        trial.metrics.update({"attention/head/gamma": gamma, "attention/head/share": share})
    trials[1].metrics[ablation.WALL] = 1200.0
    trials[2].metrics[ablation.TUNE_WALL] = 1200.0  # a trial older than WALL: Tune's figure
    trials[3].metrics.update({"attention/stem/gamma": 0.05, "attention/stem/share": 0.01})
    fcn, cc, stem = ablation.summarise(trials, {"fcn": cost, "cc": cost, "stem": cost})
    assert fcn.place is None and cc.place == "head" and stem.place == "stem"
    assert cc.gamma.mean == pytest.approx(0.3) and cc.share.mean == pytest.approx(0.2)
    table = ablation.results_table([fcn, cc, stem]).splitlines()
    assert "| - | 0.001 | 1.00 | 0.100 | 10.0 | 10.0 | 500 | 0 |" in table[2]  # fcn: no attention; 10 min
    assert "| head 0.300 / 0.200 | 0.001 |" in table[3] and "| 20.0 |" in table[3]
    assert "| stem 0.050 / 0.010 |" in table[4] and "| - | 500 |" in table[4]  # no wall time reported
    parsed = list(csv.DictReader(io.StringIO(ablation.results_csv([fcn, cc, stem]))))
    assert parsed[1]["attention_place"] == "head" and float(parsed[1]["share_mean"]) == pytest.approx(0.2)
    assert float(parsed[1]["wall_seconds_mean"]) == 1200.0 and parsed[0]["gamma_mean"] == ""
