"""Attention diagnostics against dense oracles and hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from ccnet import AxialAttention, CrissCrossAttention, NonLocal2d, RecurrentAttention, build_ccnet
from ccnet.diagnostics import FIGURES, attention_diagnostics, measure, never_engaged, never_engaged_note

MODULES = [CrissCrossAttention, AxialAttention, NonLocal2d]


def _module(cls: type, gamma: float, channels: int = 16) -> nn.Module:
    torch.manual_seed(0)
    module = cls(channels, impl="autograd")
    with torch.no_grad():
        module.gamma.fill_(gamma)
    return module


def _uniform(module: nn.Module) -> nn.Module:
    """Zero query and key projections: every energy is 0, so each softmax is uniform over its keys."""
    with torch.no_grad():
        for conv in (module.query, module.key):
            conv.weight.zero_()
            conv.bias.zero_()
    return module


def _dense_softmax(energy: Tensor, allowed: Tensor) -> Tensor:
    return energy.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def dense_weights(module: nn.Module, x: Tensor) -> Tensor:
    """(B, HW, HW): the weight each output pixel gives each value pixel, from dense attention restricted by
    masks (criss-cross: row or column; axial: the column softmax times the row softmax; non-local: all)."""
    height, width = x.shape[2:]
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    same_row, same_col = rows[:, None] == rows[None, :], cols[:, None] == cols[None, :]
    energy = torch.einsum("bci,bcj->bij", module.query(x).flatten(2), module.key(x).flatten(2))
    if isinstance(module, CrissCrossAttention):
        return _dense_softmax(energy, same_row | same_col)
    if isinstance(module, AxialAttention):  # out = column @ (row @ value)
        return _dense_softmax(energy, same_col) @ _dense_softmax(energy, same_row)
    return energy.softmax(dim=-1)


def dense_figures(module: nn.Module, x: Tensor) -> dict[str, float]:
    """The figures straight from their definitions over the dense weights."""
    weights = dense_weights(module, x)
    aggregated = torch.einsum("bij,bcj->bci", weights, module.value(x).flatten(2))
    height, width = x.shape[2:]
    pixels = torch.tensor([(row, col) for row in range(height) for col in range(width)], dtype=torch.float32)
    apart = torch.cdist(pixels, pixels)  # Euclidean, in feature pixels
    return {
        "gamma": float(module.gamma),
        "share": float((module.gamma * aggregated).norm() / x.norm()),
        "entropy": float(-(weights * weights.clamp_min(1e-30).log()).sum(-1).mean()),
        "distance": float((weights * apart).sum(-1).mean()),
    }


@pytest.mark.parametrize("cls", MODULES)
@pytest.mark.parametrize("gamma", [0.0, 0.7, -0.3])
def test_figures_match_the_dense_oracle(cls: type, gamma: float) -> None:
    module = _module(cls, gamma)
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        figures, expected = measure(module, x), dense_figures(module, x)
    for name, value in expected.items():
        assert figures[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    if gamma == 0.0:
        assert figures["share"] == 0.0  # exactly: the attention adds nothing


# Uniform criss-cross on a 3x3 map: each pixel weighs the 5 pixels of its cross by 1/5. Along one axis the sum
# of |offsets| from positions 0, 1, 2 is 3, 2, 3 (mean 8/3), once for the row and once for the column (the
# centre, at 0, counts in both): mean distance (8/3 + 8/3) / 5 = 16/15. On 2x3: 4 keys, the row part as
# before (8/3), the column part 1 from either row: (8/3 + 1) / 4 = 11/12.
# Uniform over all 9 pixels of 3x3 (non-local, and axial, whose passes compose to it): per axis an offset of
# 0, 1, 2 has probability 3/9, 4/9, 2/9; E[sqrt(dr^2 + dc^2)] = (48 + 24 sqrt 2 + 16 sqrt 5) / 81. On 2x3,
# with row offsets 0, 1 at 1/2 each: (11 + 4 sqrt 2 + 2 sqrt 5) / 18.
CROSS_3X3, CROSS_2X3 = 16 / 15, 11 / 12
EVERYWHERE_3X3 = (48 + 24 * math.sqrt(2) + 16 * math.sqrt(5)) / 81
EVERYWHERE_2X3 = (11 + 4 * math.sqrt(2) + 2 * math.sqrt(5)) / 18


@pytest.mark.parametrize(
    ("cls", "size", "keys", "distance"),
    [
        (CrissCrossAttention, (3, 3), 5, CROSS_3X3),
        (CrissCrossAttention, (2, 3), 4, CROSS_2X3),
        (AxialAttention, (3, 3), 9, EVERYWHERE_3X3),
        (AxialAttention, (2, 3), 6, EVERYWHERE_2X3),
        (NonLocal2d, (3, 3), 9, EVERYWHERE_3X3),
        (NonLocal2d, (2, 3), 6, EVERYWHERE_2X3),
    ],
)
def test_uniform_attention_by_hand(cls: type, size: tuple[int, int], keys: int, distance: float) -> None:
    module = _uniform(_module(cls, 0.5))
    figures = measure(module, torch.randn(3, 16, *size))
    assert figures["entropy"] == pytest.approx(math.log(keys), rel=1e-5)
    assert figures["entropy_normalised"] == pytest.approx(1.0, rel=1e-5)
    assert figures["distance"] == pytest.approx(distance, rel=1e-5)


def test_focused_attention_has_low_entropy() -> None:
    module = _module(NonLocal2d, 0.5)
    with torch.no_grad():  # energies scaled up a hundredfold: each softmax close to one-hot
        module.query.weight.mul_(100.0)
    figures = measure(module, torch.randn(2, 16, 4, 4))
    assert figures["entropy_normalised"] < 0.2


class Wrapped(nn.Module):
    """A model holding one attention module, applied ``recurrence`` times behind a conv."""

    def __init__(self, attention: nn.Module, recurrence: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.head_attention = RecurrentAttention(attention, recurrence)

    def forward(self, image: Tensor) -> Tensor:
        return self.head_attention(self.conv(image))


@pytest.mark.parametrize("cls", MODULES)
def test_recurrence_averages_its_applications(cls: type) -> None:
    model = Wrapped(_module(cls, 0.8), recurrence=2)
    image = torch.randn(2, 3, 4, 6)
    metrics = attention_diagnostics(model, image)
    attention = model.head_attention.attention
    with torch.no_grad():
        first = model.conv(image)
        steps = [dense_figures(attention, first), dense_figures(attention, attention(first))]
    assert set(metrics) == {f"attention/head/{figure}" for figure in FIGURES}
    for name in ("gamma", "share", "entropy", "distance"):
        expected = (steps[0][name] + steps[1][name]) / 2
        assert metrics[f"attention/head/{name}"] == pytest.approx(expected, rel=1e-4), name
    assert steps[0]["share"] != pytest.approx(steps[1]["share"], rel=1e-3)  # two different applications


def test_ccnet_reports_head_and_stem_and_nothing_without_attention() -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 3, 64, 64)
    both = build_ccnet("ccnet_tiny", 3, placement="both", recurrence=2)
    with torch.no_grad():
        both.head.attention.attention.gamma.fill_(0.25)
    metrics = attention_diagnostics(both.train(), image)
    assert set(metrics) == {f"attention/{place}/{figure}" for place in ("head", "stem") for figure in FIGURES}
    assert metrics["attention/head/gamma"] == 0.25 and metrics["attention/head/share"] > 0
    assert metrics["attention/stem/gamma"] == 0.0 and metrics["attention/stem/share"] == 0.0
    assert both.training and all(module.training for module in both.modules())  # modes left as they were
    assert attention_diagnostics(build_ccnet("ccnet_tiny", 3, recurrence=0), image) == {}


def _history(*shares: float, place: str = "head") -> list[dict[str, float]]:
    return [{f"attention/{place}/share": share, f"attention/{place}/gamma": share / 2} for share in shares]


def test_never_engaged_looks_at_the_whole_history() -> None:
    assert never_engaged(_history(0.001, 0.004, 0.003)) == ["head"]
    assert never_engaged(_history(0.001, 0.06, 0.003)) == []  # engaged once, then faded: it was used
    head, stem = _history(0.01, 0.02), _history(0.1, 0.2, place="stem")
    stem_engaged = [h | s for h, s in zip(head, stem, strict=True)]
    assert never_engaged(stem_engaged) == ["head"]
    assert never_engaged([]) == [] and never_engaged([{}]) == []
    assert never_engaged_note(_history(0.01, 0.06)) is None
    note = never_engaged_note(_history(0.001, 0.004, 0.003))
    assert note == (
        "attention never engaged: head share 0.003 < 0.05 at the end (gamma 0.0015, at most "
        "0.004 over 3 measurements)"
    )
