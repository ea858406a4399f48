"""Tests for ccnet.losses against hand-computed values and explicit python-loop oracles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ccnet.losses import SegmentationLoss, category_consistent_loss, cross_entropy, ohem_cross_entropy

IGNORE = 255


def _random_case(
    seed: int, batch: int = 2, classes: int = 3, height: int = 4, width: int = 5, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, K, H, W) and targets (B, H, W) with roughly a fifth of the pixels ignored."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(batch, classes, height, width, generator=generator)
    target = torch.randint(0, classes, (batch, height, width), generator=generator)
    ignored = torch.rand(batch, height, width, generator=generator) < 0.2
    return logits, target.masked_fill(ignored, IGNORE)


def _pixel_stats(logits: torch.Tensor, target: torch.Tensor) -> list[tuple[float, float]]:
    """(p(gt), cross-entropy) of every labelled pixel, computed one pixel at a time with math."""
    stats = []
    batch, classes, height, width = logits.shape
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                label = int(target[b, y, x])
                if label == IGNORE:
                    continue
                exps = [math.exp(float(logits[b, k, y, x])) for k in range(classes)]
                prob = exps[label] / sum(exps)
                stats.append((prob, -math.log(prob)))
    return stats


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --- cross_entropy -----------------------------------------------------------------------------------------


def test_cross_entropy_matches_torch_with_ignored_pixels() -> None:
    logits, target = _random_case(seed=0)
    assert (target == IGNORE).any() and (target != IGNORE).any()
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(cross_entropy(logits, target), expected)


def test_cross_entropy_hand_computed() -> None:
    # Two pixels, two classes, both labelled 1: p(gt) = 3/4 at the first pixel, 1/4 at the second.
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[math.log(3.0), 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1, 1]]])
    expected = (math.log(4 / 3) + math.log(4)) / 2
    assert cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    target_one_ignored = torch.tensor([[[1, IGNORE]]])
    assert cross_entropy(logits, target_one_ignored).item() == pytest.approx(math.log(4 / 3), rel=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_finite_gradient() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE)
    loss = cross_entropy(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_weighted_cross_entropy_matches_torch_and_a_hand_computed_case() -> None:
    logits, target = _random_case(seed=3)
    weight = torch.tensor([0.5, 2.0, 4.0])
    expected = F.cross_entropy(logits, target, weight, ignore_index=IGNORE)
    torch.testing.assert_close(cross_entropy(logits, target, weight=weight), expected)
    # The two pixels of test_cross_entropy_hand_computed, now labelled 1 and 0: CE ln(4/3) at weight 2 and
    # ln(4/3) ... the second pixel's p(class 0) = 3/4 too, at weight 0.5: (2 + 0.5) ln(4/3) / 2.5 = ln(4/3).
    two = torch.tensor([[[[0.0, math.log(3.0)]], [[math.log(3.0), 0.0]]]])  # (1, 2, 1, 2)
    assert cross_entropy(two, torch.tensor([[[1, 0]]]), weight=torch.tensor([0.5, 2.0])).item() == (
        pytest.approx(math.log(4 / 3), rel=1e-6)
    )
    # Labels 1 and 1 (CE ln(4/3) and ln 4), weight 2 each: the weights cancel, the plain mean.
    assert cross_entropy(two, torch.tensor([[[1, 1]]]), weight=torch.tensor([0.5, 2.0])).item() == (
        pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-6)
    )
    # Equal weights are the unweighted loss; all pixels ignored is 0, as without weights.
    torch.testing.assert_close(
        cross_entropy(logits, target, weight=torch.full((3,), 7.0)), cross_entropy(logits, target)
    )
    assert cross_entropy(logits, torch.full_like(target, IGNORE), weight=weight).item() == 0.0


def test_weighted_ohem_keeps_the_same_pixels_and_weighs_them() -> None:
    logits, target = _random_case(seed=1)
    weight = [0.5, 2.0, 4.0]
    # Which pixels are hard does not depend on the weights; the kept ones are averaged with them.
    kept = [
        (prob, ce, weight[int(label)])
        for (prob, ce), label in zip(
            _pixel_stats(logits, target), target[target != IGNORE].tolist(), strict=True
        )
        if prob <= 0.5
    ]
    expected = sum(w * ce for _, ce, w in kept) / sum(w for *_, w in kept)
    got = ohem_cross_entropy(logits, target, thresh=0.5, min_kept=0, weight=torch.tensor(weight))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # min_kept covering every pixel: the weighted cross-entropy over all labelled ones.
    everything = ohem_cross_entropy(logits, target, thresh=0.5, min_kept=10**6, weight=torch.tensor(weight))
    torch.testing.assert_close(
        everything, F.cross_entropy(logits, target, torch.tensor(weight), ignore_index=IGNORE)
    )


# --- ohem_cross_entropy ------------------------------------------------------------------------------------


def test_ohem_min_kept_zero_keeps_only_pixels_at_or_below_thresh() -> None:
    logits, target = _random_case(seed=1)
    thresh = 0.5
    stats = _pixel_stats(logits, target)
    hard = [ce for prob, ce in stats if prob <= thresh]
    assert 0 < len(hard) < len(stats), "the case must have both easy and hard pixels"
    loss = ohem_cross_entropy(logits, target, thresh=thresh, min_kept=0)
    assert loss.item() == pytest.approx(_mean(hard), rel=1e-5)


def test_ohem_gradient_reaches_only_kept_pixels() -> None:
    logits, target = _random_case(seed=1)
    logits.requires_grad_(True)
    thresh = 0.5
    ohem_cross_entropy(logits, target, thresh=thresh, min_kept=0).backward()
    prob_gt = torch.softmax(logits.detach(), dim=1).gather(1, target.clamp(max=2)[:, None])[:, 0]
    kept = (target != IGNORE) & (prob_gt <= thresh)  # (B, H, W)
    has_grad = logits.grad.abs().sum(dim=1) > 0  # (B, H, W)
    assert torch.equal(has_grad, kept)


@pytest.mark.parametrize("extra", [0, 1, 7, 1000])
def test_ohem_min_kept_at_least_num_valid_equals_plain_cross_entropy(extra: int) -> None:
    logits, target = _random_case(seed=2)
    num_valid = int((target != IGNORE).sum())
    # thresh so small that no pixel is hard: only the min_kept rule can keep anything.
    loss = ohem_cross_entropy(logits, target, thresh=1e-9, min_kept=num_valid + extra)
    expected = _mean([ce for _, ce in _pixel_stats(logits, target)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("min_kept", [1, 5, 12])
def test_ohem_keeps_the_min_kept_hardest_when_none_is_below_thresh(min_kept: int) -> None:
    logits, target = _random_case(seed=3, scale=1.0)
    thresh = 1e-3
    stats = sorted(_pixel_stats(logits, target))
    assert stats[0][0] > thresh and len(stats) > min_kept
    assert len({prob for prob, _ in stats}) == len(stats), "ties would make the kept set ambiguous"
    loss = ohem_cross_entropy(logits, target, thresh=thresh, min_kept=min_kept)
    expected = _mean([ce for _, ce in stats[:min_kept]])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ohem_thresh_rules_when_more_than_min_kept_are_hard() -> None:
    logits, target = _random_case(seed=1)
    thresh = 0.5
    hard = [ce for prob, ce in _pixel_stats(logits, target) if prob <= thresh]
    assert len(hard) > 3
    loss = ohem_cross_entropy(logits, target, thresh=thresh, min_kept=3)
    assert loss.item() == pytest.approx(_mean(hard), rel=1e-5)


@pytest.mark.parametrize(("kwargs", "match"), [({"thresh": 0.0}, "thresh"), ({"min_kept": -1}, "min_kept")])
def test_ohem_rejects_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    logits, target = _random_case(seed=0)
    with pytest.raises(ValueError, match=match):
        ohem_cross_entropy(logits, target, **kwargs)


# --- category_consistent_loss ------------------------------------------------------------------------------


def _embedding_from_points(points: list[tuple[float, float]]) -> torch.Tensor:
    """(1, 2, 1, N) embedding whose pixel i is points[i]."""
    return torch.tensor(points).t()[None, :, None, :].contiguous()


def test_category_consistent_loss_hand_computed() -> None:
    # Class 0: (0, 0), (2, 0) -> mean (1, 0), both at distance 1 in (delta_v, delta_d]: (1 - 0.5)^2 each.
    # Class 1: (0, 0.5), (0, 4.5) -> mean (0, 2.5), both at distance 2 > delta_d: 2 - 1.5 + (1.5 - 0.5)^2.
    # The ignored pixel sits far away and must not move anything.
    points = [(0.0, 0.0), (0.0, 0.5), (100.0, 100.0), (2.0, 0.0), (0.0, 4.5)]
    embedding = _embedding_from_points(points)
    target = torch.tensor([[[0, 1, IGNORE, 0, 1]]])
    terms = category_consistent_loss(embedding, target, delta_v=0.5, delta_d=1.5)

    var_class0 = (1.0 - 0.5) ** 2
    var_class1 = 2.0 - 1.5 + (1.5 - 0.5) ** 2
    mean_distance = math.sqrt(1.0**2 + 2.5**2)  # < 2 * delta_d = 3
    assert terms["var"].item() == pytest.approx((var_class0 + var_class1) / 2, rel=1e-6)
    assert terms["dis"].item() == pytest.approx((3.0 - mean_distance) ** 2, rel=1e-5)
    assert terms["reg"].item() == pytest.approx((1.0 + 2.5) / 2, rel=1e-6)


def test_category_consistent_loss_averages_over_images() -> None:
    # Image 0 is the hand-computed case above; image 1 has one class with identical embeddings at the
    # origin, so every term is 0 there and the batch value is half of image 0's.
    first = _embedding_from_points([(0.0, 0.0), (0.0, 0.5), (100.0, 100.0), (2.0, 0.0), (0.0, 4.5)])
    second = torch.zeros_like(first)
    embedding = torch.cat([first, second])
    target = torch.tensor([[[0, 1, IGNORE, 0, 1]], [[2, 2, 2, 2, 2]]])
    single = category_consistent_loss(first, target[:1])
    batch = category_consistent_loss(embedding, target)
    for name in ("var", "dis", "reg"):
        assert batch[name].item() == pytest.approx(single[name].item() / 2, rel=1e-6), name


def test_category_consistent_loss_downsamples_target_with_nearest() -> None:
    generator = torch.Generator().manual_seed(4)
    embedding = torch.randn(1, 4, 2, 3, generator=generator)
    low_res = torch.tensor([[[0, 1, IGNORE], [2, 0, 1]]])  # (1, 2, 3), one label per embedding pixel
    # PyTorch's "nearest" at a factor of 2 reads the top-left pixel of each 2x2 block; the other three hold
    # other labels, so any blending or a different sampling point changes the classes seen.
    high_res = torch.randint(0, 3, (1, 4, 6), generator=generator)
    high_res[:, ::2, ::2] = low_res
    assert (high_res[:, 1::2, 1::2] != low_res).any()
    expected = category_consistent_loss(embedding, low_res)
    got = category_consistent_loss(embedding, high_res)
    for name in ("var", "dis", "reg"):
        torch.testing.assert_close(got[name], expected[name])


def test_category_consistent_loss_zero_var_and_dis_for_tight_far_apart_classes() -> None:
    generator = torch.Generator().manual_seed(5)
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # pairwise >= 4 > 2 * 1.5
    labels = torch.arange(3).repeat_interleave(4)  # (12,)
    noise = torch.randn(12, 3, generator=generator)
    noise = 0.2 * noise / noise.norm(dim=1, keepdim=True)  # every point within 0.4 of its class mean
    points = centres[labels] + noise - noise.view(3, 4, 3).mean(dim=1)[labels]  # class means stay put
    embedding = points.t().reshape(1, 3, 3, 4)  # (1, E=3, h=3, w=4)
    target = labels.reshape(1, 3, 4)
    terms = category_consistent_loss(embedding, target, delta_v=0.5, delta_d=1.5)
    assert terms["var"].item() == 0.0
    assert terms["dis"].item() == 0.0
    # Pulling the classes together brings the distance term back: the zero is not vacuous.
    close = category_consistent_loss(embedding * 0.5, target, delta_v=0.5, delta_d=1.5)
    assert close["dis"].item() > 0.0


def test_category_consistent_loss_gradient_reaches_embedding() -> None:
    generator = torch.Generator().manual_seed(6)
    embedding = (3.0 * torch.randn(2, 4, 3, 3, generator=generator)).requires_grad_(True)
    target = torch.randint(0, 3, (2, 6, 6), generator=generator)
    target[1] = IGNORE  # an image with no labelled pixel must not break the graph or the average
    terms = category_consistent_loss(embedding, target)
    sum(terms.values()).backward()
    assert torch.isfinite(embedding.grad).all()
    assert embedding.grad[0].abs().sum() > 0
    assert embedding.grad[1].abs().sum() == 0


def test_category_consistent_loss_all_ignored_is_zero_with_gradient() -> None:
    embedding = torch.randn(1, 4, 2, 2, requires_grad=True)
    terms = category_consistent_loss(embedding, torch.full((1, 2, 2), IGNORE))
    assert all(value.item() == 0.0 for value in terms.values())
    sum(terms.values()).backward()
    assert embedding.grad is not None and torch.isfinite(embedding.grad).all()


# --- SegmentationLoss --------------------------------------------------------------------------------------


def test_segmentation_loss_is_main_plus_weighted_aux() -> None:
    out, target = _random_case(seed=7)
    aux, _ = _random_case(seed=8)
    losses = SegmentationLoss()({"out": out, "aux": aux}, target)
    main = F.cross_entropy(out, target, ignore_index=IGNORE)
    aux_loss = F.cross_entropy(aux, target, ignore_index=IGNORE)
    torch.testing.assert_close(losses["main"], main)
    torch.testing.assert_close(losses["aux"], aux_loss)
    torch.testing.assert_close(losses["loss"], main + 0.4 * aux_loss)
    assert set(SegmentationLoss()({"out": out}, target)) == {"loss", "main"}


def test_segmentation_loss_upsamples_mismatched_logits() -> None:
    out, _ = _random_case(seed=9, height=3, width=4)
    _, target = _random_case(seed=10, height=6, width=8)
    losses = SegmentationLoss()({"out": out, "aux": out}, target)
    upsampled = F.interpolate(out, size=(6, 8), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(upsampled, target, ignore_index=IGNORE)
    torch.testing.assert_close(losses["main"], expected)
    torch.testing.assert_close(losses["loss"], 1.4 * expected)


def test_segmentation_loss_ohem_on_main_only() -> None:
    out, target = _random_case(seed=1)
    aux, _ = _random_case(seed=11)
    criterion = SegmentationLoss(ohem=True, ohem_thresh=0.5, ohem_min_kept=0)
    losses = criterion({"out": out, "aux": aux}, target)
    hard = [ce for prob, ce in _pixel_stats(out, target) if prob <= 0.5]
    assert losses["main"].item() == pytest.approx(_mean(hard), rel=1e-5)
    torch.testing.assert_close(losses["aux"], F.cross_entropy(aux, target, ignore_index=IGNORE))


@pytest.mark.parametrize("batch", [1, 2])
def test_segmentation_loss_ohem_min_kept_counts_per_image(batch: int) -> None:
    # Two classes, every pixel labelled 1, logits (0, log(p / (1 - p))): p(gt) = p exactly. No pixel is
    # below thresh, so only min_kept keeps: 2 per image, i.e. the 2 * batch hardest of the whole batch.
    probs = [[0.1, 0.2, 0.3, 0.4], [0.15, 0.25, 0.35, 0.45]][:batch]  # (B, W) per-pixel p(gt)
    z = torch.tensor([[math.log(p / (1 - p)) for p in row] for row in probs])  # (B, W)
    logits = torch.stack([torch.zeros_like(z), z], dim=1)[:, :, None]  # (B, 2, 1, W)
    target = torch.ones(batch, 1, 4, dtype=torch.long)
    criterion = SegmentationLoss(ohem=True, ohem_thresh=0.05, ohem_min_kept=2)
    kept = [0.1, 0.2] if batch == 1 else [0.1, 0.15, 0.2, 0.25]  # by hand
    expected = _mean([-math.log(p) for p in kept])
    assert criterion({"out": logits}, target)["main"].item() == pytest.approx(expected, rel=1e-6)
    if batch == 2:  # the count of one image over the whole batch keeps another set
        assert expected != pytest.approx(_mean([-math.log(p) for p in (0.1, 0.15)]))


def test_segmentation_loss_ohem_min_kept_defaults_to_the_reference_per_image() -> None:
    # The authors' OhemCrossEntropy2d(min_kept=100000) over a GPU batch of 2 images.
    assert SegmentationLoss().ohem_min_kept == 100_000 // 2


def test_segmentation_loss_adds_weighted_consistency_terms() -> None:
    out, target = _random_case(seed=12, height=4, width=6)
    embedding = torch.randn(2, 5, 2, 3, generator=torch.Generator().manual_seed(13))
    criterion = SegmentationLoss(consistency=True, consistency_weights=(1.0, 2.0, 0.5))
    losses = criterion({"out": out, "embedding": embedding}, target)
    terms = category_consistent_loss(embedding, target)
    main = F.cross_entropy(out, target, ignore_index=IGNORE)
    expected = main + 1.0 * terms["var"] + 2.0 * terms["dis"] + 0.5 * terms["reg"]
    torch.testing.assert_close(losses["loss"], expected)
    assert {"var", "dis", "reg"} <= set(losses)


def test_segmentation_loss_requires_embedding_with_consistency() -> None:
    out, target = _random_case(seed=0)
    with pytest.raises(ValueError, match="embedding"):
        SegmentationLoss(consistency=True)({"out": out}, target)


def test_segmentation_loss_weighs_main_and_aux_by_class_and_moves_its_weights() -> None:
    out, target = _random_case(seed=7)
    aux, _ = _random_case(seed=8)
    weights = (0.5, 2.0, 4.0)
    criterion = SegmentationLoss(class_weights=weights)
    losses = criterion({"out": out, "aux": aux}, target)
    weight = torch.tensor(weights)
    torch.testing.assert_close(losses["main"], F.cross_entropy(out, target, weight, ignore_index=IGNORE))
    torch.testing.assert_close(losses["aux"], F.cross_entropy(aux, target, weight, ignore_index=IGNORE))
    # A buffer: it follows the module's device and dtype moves, and is not saved in a state dict.
    assert criterion.class_weights is not None and "class_weights" not in criterion.state_dict()
    assert criterion.to(torch.float64).class_weights.dtype == torch.float64
    half = criterion({"out": out.bfloat16(), "aux": aux.bfloat16()}, target)  # float32 weights, bf16 logits
    assert half["loss"].item() == pytest.approx(losses["loss"].item(), rel=0.05)
    assert "class_weights=[0.5, 2.0, 4.0]" in repr(criterion) and "class_weights=None" in repr(
        SegmentationLoss()
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aux_weight": -0.1}, r"aux_weight.*-0\.1"),
        ({"ohem_thresh": 0.0}, r"ohem_thresh.*0\.0"),
        ({"ohem_thresh": 1.5}, r"ohem_thresh.*1\.5"),
        ({"ohem_min_kept": -1}, r"ohem_min_kept.*-1"),
        ({"consistency_weights": (1.0, -1.0, 0.001)}, r"consistency_weights.*-1\.0"),
        ({"delta_v": -0.5}, r"delta_v.*-0\.5"),
        ({"delta_v": 1.0, "delta_d": 1.0}, r"delta_d.*1\.0"),
        ({"class_weights": (1.0, -1.0)}, r"class_weights.*-1\.0"),
        ({"class_weights": (0.0, 0.0)}, r"class_weights.*not all 0"),
        ({"class_weights": (1.0, math.nan)}, r"class_weights.*nan"),
    ],
)
def test_segmentation_loss_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SegmentationLoss(**kwargs)
