"""Paired initialisation: for one seed, every layer that two variants share starts with the same weights,
whatever attention (if any) the variants add. An ablation pairs its variants seed by seed on that basis."""

from __future__ import annotations

import pytest
import torch

from ccnet import build_ccnet

# The CamVid ablation's variants and more: R=0 (no attention module at all), R=1..3, the other attentions,
# attention before the backbone and both placements.
VARIANTS = {
    "fcn": {"recurrence": 0},
    "cc_r1": {"recurrence": 1},
    "cc_r2": {"recurrence": 2},
    "cc_r3": {"recurrence": 3},
    "axial_r1": {"attention": "axial", "recurrence": 1},
    "nonlocal": {"attention": "nonlocal", "recurrence": 1},
    "stem_cc_r2": {"placement": "stem", "recurrence": 2},
    "both_cc_r2": {"placement": "both", "recurrence": 2},
}


def _build(seed: int, **overrides: object) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The tiny model's initial state for ``seed``, and the global stream's next draw after building it."""
    torch.manual_seed(seed)
    model = build_ccnet("ccnet_tiny", num_classes=5, **overrides)
    return model.state_dict(), torch.rand(4)


def _attention_key(key: str) -> bool:
    return key.startswith("stem_attention.") or key.startswith("head.attention.")


@pytest.mark.parametrize("variant", [name for name in VARIANTS if name != "fcn"])
def test_shared_layers_start_identical_in_every_variant(variant: str) -> None:
    baseline, baseline_next = _build(3, **VARIANTS["fcn"])
    state, next_draw = _build(3, **VARIANTS[variant])
    shared = set(baseline) & set(state)
    assert set(baseline) <= set(state)  # the FCN twin's layers are all in every variant
    assert all(_attention_key(key) for key in set(state) - shared)  # the rest is attention
    for key in shared:
        assert torch.equal(baseline[key], state[key]), key
    # Training draws (dropout) continue from the same point of the global stream.
    assert torch.equal(baseline_next, next_draw)


def test_attention_weights_follow_the_seed_and_the_placement() -> None:
    first, _ = _build(3, placement="both")
    again, _ = _build(3, placement="both")
    other_seed, _ = _build(4, placement="both")
    key = "attention.attention.query.weight"
    assert torch.equal(first[f"head.{key}"], again[f"head.{key}"])
    assert not torch.equal(first[f"head.{key}"], other_seed[f"head.{key}"])
    # The stem's and the head's attention are drawn from different streams (different widths aside).
    stem, head = first[f"stem_{key}"].flatten(), first[f"head.{key}"].flatten()
    size = min(stem.numel(), head.numel())
    assert not torch.equal(stem[:size], head[:size])


def test_a_seed_still_changes_the_shared_layers() -> None:
    first, _ = _build(3, recurrence=2)
    other, _ = _build(4, recurrence=2)
    assert not torch.equal(first["head.classifier.weight"], other["head.classifier.weight"])
