"""Ablation summaries: variants checked up front, costs counted, one row per variant over its seeds."""

from __future__ import annotations

import csv
import io
import math

import pytest

from pipeline.config import ConfigError, load_config
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
    metrics = {ablation.SINGLE: single, ablation.MULTI: multi, ablation.IMAGES_PER_SECOND: 10.0 + seed,
               ablation.PEAK_MEMORY: 500.0}
    return ablation.Trial(variant, seed, metrics, error)


def test_rows_hold_the_mean_and_spread_over_seeds_and_name_failed_seeds() -> None:
    cost = ablation.VariantCost(1000, 1.0, 0.1)
    trials = [
        _trial("cc", 0, 0.80, 0.82), _trial("cc", 1, 0.90, 0.92), _trial("cc", 2, 0.0, 0.0, error="diverged"),
        _trial("fcn", 0, 0.60, 0.61),
    ]
    rows = ablation.summarise(trials, {"fcn": cost, "cc": cost, "never_ran": cost})
    assert [r.variant for r in rows] == ["fcn", "cc", "never_ran"]
    fcn, cc, never = rows
    assert cc.single.mean == pytest.approx(0.85) and cc.single.spread == pytest.approx(math.sqrt(0.005))
    assert cc.single.n == 2 and cc.seeds == (0, 1, 2) and cc.failed == (2,)
    assert fcn.single.spread == 0.0 and never.single is None

    table = ablation.results_table(rows).splitlines()
    assert len(table) == 2 + 3
    assert table[2].startswith("| fcn | 60.00 | 61.00 |")  # one seed: no spread to show
    assert "| cc | 85.00 ± 7.07 | 87.00 ± 7.07 |" in table[3]
    assert "0,1,2 (failed: 2)" in table[3]
    assert table[4].startswith("| never_ran | - | - |")

    parsed = list(csv.DictReader(io.StringIO(ablation.results_csv(rows))))
    assert [p["variant"] for p in parsed] == ["fcn", "cc", "never_ran"]
    assert float(parsed[1]["miou_single_mean"]) == pytest.approx(0.85)
    assert parsed[1]["failed_seeds"] == "2" and parsed[2]["miou_single_mean"] == ""


def test_the_chart_has_a_bar_per_variant_and_protocol_beside_the_attention_cost() -> None:
    figure = ablation_figure(
        ["fcn", "cc"], {"single-scale": ([0.6, 0.8], [0.0, 0.05]), "ms+flip": ([0.62, float("nan")], [0, 0])},
        [0.0, 0.3], title="ablation",
    )
    miou_axes, cost_axes = figure.axes
    assert len(miou_axes.patches) == 4 and len(cost_axes.patches) == 2
    assert [t.get_text() for t in cost_axes.get_xticklabels()] == ["fcn", "cc"]
    assert cost_axes.patches[1].get_height() == pytest.approx(0.3)
