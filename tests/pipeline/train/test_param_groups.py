"""The optimiser's parameter groups: every trainable parameter in exactly one group (DANet#84 lost its head
by leaving it out), the head's learning-rate multiple and 1-D parameters out of weight decay."""

from __future__ import annotations

import pytest
import torch

from ccnet import build_ccnet
from pipeline.config import load_config
from pipeline.train.build import build_optimizer, parameter_groups
from pipeline.train.loop import group_lrs, poly_lr


def _group_of(groups: list[dict], model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the names of every group holding it."""
    names = {id(p): name for name, p in model.named_parameters()}
    found: dict[str, list[str]] = {name: [] for name in names.values()}
    for group in groups:
        for parameter in group["params"]:
            found[names[id(parameter)]].append(group["name"])
    return found


@pytest.mark.parametrize("stem_lr_mult", [None, 1.0])
@pytest.mark.parametrize("no_decay_1d", [False, True])
@pytest.mark.parametrize(
    "overrides", [{}, {"recurrence": 0}, {"placement": "both"}, {"placement": "stem"}, {"aux_channels": 0}]
)
def test_every_trainable_parameter_is_in_exactly_one_group(
    no_decay_1d: bool, overrides: dict, stem_lr_mult: float | None
) -> None:
    model = build_ccnet("ccnet_tiny", num_classes=5, **overrides)
    frozen = "backbone.stem.0.0.weight"
    model.get_parameter(frozen).requires_grad_(False)  # a frozen parameter belongs to no group
    groups = parameter_groups(
        model, head_lr_mult=10.0, weight_decay=5e-4, no_decay_1d=no_decay_1d, stem_lr_mult=stem_lr_mult
    )
    membership = _group_of(groups, model)
    assert membership.pop(frozen) == []
    assert all(len(held) == 1 for held in membership.values()), membership
    assert all(group["params"] for group in groups)  # no empty group


def test_groups_split_backbone_and_head_and_keep_1d_out_of_decay() -> None:
    model = build_ccnet("ccnet_tiny", num_classes=5, placement="both")
    groups = {
        g["name"]: g for g in parameter_groups(model, head_lr_mult=10.0, weight_decay=5e-4, no_decay_1d=True)
    }
    membership = {name: held[0] for name, held in _group_of(list(groups.values()), model).items()}
    assert membership["head.attention.attention.gamma"] == "head_no_decay"
    assert membership["stem_attention.attention.gamma"] == "head_no_decay"  # outside the backbone
    assert membership["head.attention.attention.query.weight"] == "head"
    assert membership["head.classifier.bias"] == "head_no_decay"
    assert membership["aux_head.2.weight"] == "head"
    assert all(
        group
        == (
            "backbone"
            if name.endswith(".weight") and model.get_parameter(name).ndim > 1
            else "backbone_no_decay"
        )
        for name, group in membership.items()
        if name.startswith("backbone.")
    )
    assert groups["backbone"]["lr_mult"] == groups["backbone_no_decay"]["lr_mult"] == 1.0
    assert groups["head"]["lr_mult"] == groups["head_no_decay"]["lr_mult"] == 10.0
    assert groups["head"]["weight_decay"] == groups["backbone"]["weight_decay"] == 5e-4
    assert groups["head_no_decay"]["weight_decay"] == groups["backbone_no_decay"]["weight_decay"] == 0.0


def test_the_stem_attention_takes_its_own_rate_when_asked() -> None:
    """train.stem_lr_mult: the attention before the backbone in groups of its own at that multiple (the
    head keeps its own); unset, it stays in the head's groups, as before the key existed."""
    config = load_config(
        None,
        [
            "model.name=ccnet_tiny",
            "model.placement=both",
            "train.head_lr_mult=10",
            "train.stem_lr_mult=1",
            "train.no_decay_1d=true",
        ],
    )
    model = build_ccnet("ccnet_tiny", num_classes=5, placement="both")
    optimizer = build_optimizer(config, model)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert lrs == pytest.approx(
        {
            "backbone": 0.01,
            "backbone_no_decay": 0.01,
            "stem": 0.01,
            "stem_no_decay": 0.01,
            "head": 0.1,
            "head_no_decay": 0.1,
        }
    )
    membership = {name: held[0] for name, held in _group_of(optimizer.param_groups, model).items()}
    stem = {name: group for name, group in membership.items() if name.startswith("stem_attention.")}
    assert stem["stem_attention.attention.gamma"] == "stem_no_decay"
    assert set(stem.values()) == {"stem", "stem_no_decay"}
    assert membership["head.attention.attention.gamma"] == "head_no_decay"
    model = build_ccnet("ccnet_tiny", num_classes=5, placement="both")
    unset = build_optimizer(load_config(None, ["model.name=ccnet_tiny", "train.head_lr_mult=10"]), model)
    assert [group["name"] for group in unset.param_groups] == ["backbone", "head"]


def test_reference_recipe_is_one_decayed_rate_for_all() -> None:
    """The paper's configs (head_lr_mult 1, no_decay_1d false): every parameter at lr with decay."""
    config = load_config(None, ["model.name=ccnet_tiny"])
    model = build_ccnet("ccnet_tiny", num_classes=5)
    optimizer = build_optimizer(config, model)
    assert {(g["lr"], g["weight_decay"]) for g in optimizer.param_groups} == {(0.01, 5e-4)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_the_head_lr_multiple_follows_the_poly_schedule_and_is_logged() -> None:
    config = load_config(None, ["model.name=ccnet_tiny", "train.head_lr_mult=10", "train.no_decay_1d=true"])
    model = build_ccnet("ccnet_tiny", num_classes=5)
    optimizer = build_optimizer(config, model)
    assert group_lrs(optimizer) == {
        "train/lr/backbone": 0.01,
        "train/lr/backbone_no_decay": 0.01,
        "train/lr/head": pytest.approx(0.1),
        "train/lr/head_no_decay": pytest.approx(0.1),
    }
    lr = poly_lr(0.01, 50, 100, 0.9)
    for group in optimizer.param_groups:  # what the loop does every iteration
        group["lr"] = lr * group["lr_mult"]
    rates = group_lrs(optimizer)
    assert rates["train/lr/backbone"] == pytest.approx(lr)
    assert rates["train/lr/head"] == pytest.approx(10 * lr)


def test_gamma_moves_at_the_head_rate() -> None:
    """One SGD step with a known gradient: gamma moves by head_lr_mult x lr x grad, no decay pulling it."""
    config = load_config(
        None, ["model.name=ccnet_tiny", "train.head_lr_mult=10", "train.no_decay_1d=true", "train.momentum=0"]
    )
    model = build_ccnet("ccnet_tiny", num_classes=5)
    optimizer = build_optimizer(config, model)
    gamma = model.head.attention.attention.gamma
    with torch.no_grad():
        gamma.fill_(0.5)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    gamma.grad = torch.ones_like(gamma)
    optimizer.step()
    assert gamma.item() == pytest.approx(0.5 - 10 * 0.01 * 1.0)
