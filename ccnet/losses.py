"""Segmentation losses used to train CCNet.

- :func:`cross_entropy`: pixel-wise cross-entropy, mean over labelled pixels, 0 (not NaN) when none are;
  with class weights, the weighted mean (each pixel counts its class's weight, as ``F.cross_entropy`` does).
- :func:`ohem_cross_entropy`: online hard example mining as in the authors' ``OhemCrossEntropy2d``: keep the
  pixels whose ground-truth probability is at most ``thresh``, raising the threshold so that at least
  ``min_kept`` pixels survive.
- :func:`category_consistent_loss`: the variance / distance / regularisation terms that pull embeddings of a
  class together and push class means apart (Huang et al., TPAMI 2020, "category consistent features").
- :class:`SegmentationLoss`: combines them over a model's output dict, the reference recipe being
  ``main + 0.4 * aux``, with OHEM on the main output only. Its ``ohem_min_kept`` counts pixels per image
  (the authors' 100 000 per GPU batch of 2 images is 50 000 per image), so that the share of pixels kept does
  not depend on how many images each process holds.

Every reduction is a masked sum divided by a clamped count, so nothing here syncs with the host except the
per-image ``torch.unique`` over class ids in the category-consistent loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _masked_mean(values: Tensor, mask: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` holds, weighted by ``pixel_weights`` when given (``values`` are
    then already weighted: the sum is divided by the weights' sum); 0, still attached to the graph, where
    the mask holds nowhere."""
    mask = mask.to(values.dtype)
    count = mask if pixel_weights is None else mask * pixel_weights.to(values.dtype)
    return (values * mask).sum() / count.sum().clamp(min=1.0 if pixel_weights is None else 1e-12)


def _check_logits_target(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits (B, K, H, W) and target (B, H, W), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )


def _pixel_weights(target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor | None:
    """Each pixel's class weight (ignored pixels: 0), (B, H, W); None without class weights."""
    if weight is None:
        return None
    return weight[target.masked_fill(target == ignore_index, 0)].masked_fill(target == ignore_index, 0.0)


def cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int = 255, weight: Tensor | None = None
) -> Tensor:
    """Pixel-wise cross-entropy averaged over the pixels whose label is not ``ignore_index``.

    Args:
        logits: unnormalised class scores, (B, K, H, W).
        target: class ids in [0, K) or ``ignore_index``, int64 (B, H, W).
        ignore_index: label of pixels that contribute nothing.
        weight: per-class weights (K,), or None: the weighted mean ``sum w[y] CE / sum w[y]``, which is
            ``F.cross_entropy(weight=...)``'s.

    Returns:
        Scalar loss. When every pixel is ignored it is 0 with a (zero) gradient instead of
        ``F.cross_entropy``'s NaN, so a fully unlabelled crop cannot poison the step.
    """
    _check_logits_target(logits, target)
    weight = None if weight is None else weight.to(logits.dtype)  # half logits outside autocast too
    per_pixel = F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction="none")
    return _masked_mean(per_pixel, target != ignore_index, _pixel_weights(target, weight, ignore_index))


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = 255,
    weight: Tensor | None = None,
) -> Tensor:
    """Cross-entropy over the hard pixels only (online hard example mining).

    Among labelled pixels, a pixel is kept when its softmax probability of the true class is at most the
    threshold. The threshold is ``thresh``, raised to the ``min_kept``-th smallest probability when that is
    larger, so at least ``min_kept`` pixels are kept (more on ties). When ``min_kept`` is at least the number
    of labelled pixels, all of them are kept. The selection carries no gradient.

    Args:
        logits: unnormalised class scores, (B, K, H, W).
        target: class ids in [0, K) or ``ignore_index``, int64 (B, H, W).
        thresh: probability in (0, 1] below which a pixel counts as hard.
        min_kept: least number of pixels kept over the whole batch; 0 keeps only the hard ones.
        ignore_index: label of pixels that are never kept.
        weight: per-class weights (K,), or None: the weighted mean over the kept pixels. Which pixels are
            hard is decided by their probability alone, as without weights.

    Returns:
        Scalar mean cross-entropy over the kept pixels; 0 with a gradient when none is kept.
    """
    _check_logits_target(logits, target)
    if not 0.0 < thresh <= 1.0:
        raise ValueError(f"thresh must be in (0, 1], got {thresh}")
    if min_kept < 0:
        raise ValueError(f"min_kept must be >= 0, got {min_kept}")
    per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten()  # (N,)
    valid = target.flatten() != ignore_index  # (N,)
    pixel_weights = _pixel_weights(target.flatten(), weight, ignore_index)
    weighted = per_pixel if pixel_weights is None else per_pixel * pixel_weights
    if min_kept >= valid.numel():
        # min_kept covers every pixel, labelled or not: keep all labelled ones, decided without a sync.
        return _masked_mean(weighted, valid, pixel_weights)
    with torch.no_grad():
        # p(gt) = exp(-CE) is the softmax probability of the true class; ignored pixels get +inf so that
        # they sort after every labelled one and are never kept.
        prob = torch.exp(-per_pixel.float()).masked_fill(~valid, float("inf"))  # (N,)
        threshold = torch.tensor(thresh, dtype=torch.float32, device=prob.device)
        if min_kept > 0:
            # With min_kept >= the number of labelled pixels the k-th smallest is the largest labelled
            # probability or an ignored pixel's +inf, so every labelled pixel is kept without a branch.
            kth_smallest = torch.kthvalue(prob, min_kept).values
            threshold = torch.maximum(threshold, kth_smallest)
        kept = valid & (prob <= threshold)
    return _masked_mean(weighted, kept, pixel_weights)


def _variance_term(distance: Tensor, delta_v: float, delta_d: float) -> Tensor:
    """phi_var: 0 within delta_v, quadratic up to delta_d, then linear (continuous at delta_d)."""
    quadratic = (distance - delta_v).pow(2)
    linear = distance - delta_d + (delta_d - delta_v) ** 2
    zero = torch.zeros_like(distance)
    return torch.where(distance > delta_d, linear, torch.where(distance > delta_v, quadratic, zero))


def category_consistent_loss(
    embedding: Tensor,
    target: Tensor,
    delta_v: float = 0.5,
    delta_d: float = 1.5,
    ignore_index: int = 255,
) -> dict[str, Tensor]:
    """Category-consistent loss of CCNet (TPAMI 2020): variance, distance and regularisation terms.

    Per image, with ``mu_c`` the mean embedding of the pixels labelled ``c``:

    - ``var``: mean over classes of the mean over their pixels of ``phi_var(||mu_c - h_i||)``, where
      ``phi_var(d)`` is ``d - delta_d + (delta_d - delta_v)^2`` above ``delta_d``, ``(d - delta_v)^2`` in
      ``(delta_v, delta_d]`` and 0 otherwise;
    - ``dis``: mean over the C(C-1) ordered pairs of distinct classes of ``(2 delta_d - ||mu_a - mu_b||)^2``
      when that distance is at most ``2 delta_d``, else 0; 0 with fewer than 2 classes;
    - ``reg``: mean over classes of ``||mu_c||``.

    Each term is averaged over the images that have at least one labelled pixel; computed in float32.

    Args:
        embedding: per-pixel embeddings at feature resolution, (B, E, h, w).
        target: class ids or ``ignore_index`` at label resolution, int64 (B, H, W); resized to (h, w) by
            nearest-neighbour interpolation.
        delta_v: margin within which an embedding counts as close enough to its class mean, >= 0.
        delta_d: half the distance beyond which two class means count as far enough apart, > delta_v.
        ignore_index: label of pixels that belong to no class.

    Returns:
        ``{"var", "dis", "reg"}``, scalars attached to ``embedding``'s graph (0 with a gradient when no pixel
        is labelled).
    """
    if embedding.dim() != 4 or target.dim() != 3 or embedding.shape[0] != target.shape[0]:
        raise ValueError(
            f"expected embedding (B, E, h, w) and target (B, H, W), got {tuple(embedding.shape)} and "
            f"{tuple(target.shape)}"
        )
    if delta_v < 0 or delta_d <= delta_v:
        raise ValueError(f"need 0 <= delta_v < delta_d, got delta_v={delta_v}, delta_d={delta_d}")
    height, width = embedding.shape[2:]
    # float interpolation is exact for class ids (< 2**24); "nearest" picks one label, never a blend.
    labels = F.interpolate(target[:, None].float(), size=(height, width), mode="nearest")
    labels = labels[:, 0].long().flatten(1)  # (B, h*w)
    features = embedding.float().flatten(2).transpose(1, 2)  # (B, h*w, E)

    totals = {name: features.sum() * 0.0 for name in ("var", "dis", "reg")}
    num_images = 0
    for image_features, image_labels in zip(features, labels, strict=True):
        valid = image_labels != ignore_index
        points, point_labels = image_features[valid], image_labels[valid]  # (N, E), (N,)
        if point_labels.numel() == 0:
            continue
        num_images += 1
        classes, class_index = torch.unique(point_labels, return_inverse=True)  # (C,), (N,)
        num_classes = classes.numel()
        counts = torch.bincount(class_index, minlength=num_classes).to(points.dtype)  # (C,)
        sums = points.new_zeros(num_classes, points.shape[1]).index_add_(0, class_index, points)
        means = sums / counts[:, None]  # (C, E)

        distance = torch.linalg.vector_norm(points - means[class_index], dim=1)  # (N,)
        per_point = _variance_term(distance, delta_v, delta_d)
        per_class = points.new_zeros(num_classes).index_add_(0, class_index, per_point) / counts
        totals["var"] = totals["var"] + per_class.mean()

        if num_classes > 1:
            pair_distance = torch.linalg.vector_norm(means[:, None] - means[None], dim=2)  # (C, C)
            hinge = (2 * delta_d - pair_distance).clamp(min=0).pow(2)
            off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=hinge.device)
            totals["dis"] = totals["dis"] + hinge[off_diagonal].mean()

        totals["reg"] = totals["reg"] + torch.linalg.vector_norm(means, dim=1).mean()
    return {name: total / max(num_images, 1) for name, total in totals.items()}


def _resize_to(logits: Tensor, target: Tensor) -> Tensor:
    """Bilinearly resize (B, K, h, w) logits to the target's (H, W) when they differ."""
    if logits.shape[2:] == target.shape[1:]:
        return logits
    return F.interpolate(logits, size=target.shape[1:], mode="bilinear", align_corners=False)


class SegmentationLoss(nn.Module):
    """Training loss over a model's output dict: ``main + aux_weight * aux`` (+ consistency terms).

    The main output ``"out"`` gets OHEM cross-entropy when ``ohem`` is on, plain cross-entropy otherwise; the
    auxiliary output ``"aux"``, when present, always gets plain cross-entropy (as in the authors' reference).
    With ``consistency`` on, the category-consistent loss on ``"embedding"`` adds
    ``w_var * var + w_dis * dis + w_reg * reg``.

    Args:
        aux_weight: weight of the auxiliary head's loss, >= 0.
        ignore_index: label of pixels that contribute nothing.
        ohem: whether the main output uses online hard example mining.
        ohem_thresh: OHEM probability threshold, in (0, 1].
        ohem_min_kept: least number of pixels OHEM keeps per image, >= 0: a batch of B images keeps at least
            ``B * ohem_min_kept``. The reference is 50 000 (the authors' ``min_kept=100000`` for their batch
            of 2 images per GPU).
        consistency: whether to add the category-consistent loss (needs ``"embedding"`` in the outputs).
        consistency_weights: (w_var, w_dis, w_reg), each >= 0.
        delta_v: variance margin of the category-consistent loss, >= 0.
        delta_d: distance margin of the category-consistent loss, > delta_v.
        class_weights: per-class weights of the main and auxiliary cross-entropy (K values >= 0, one > 0),
            or None for the unweighted mean (the reference).
    """

    def __init__(
        self,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        ohem: bool = False,
        ohem_thresh: float = 0.7,
        ohem_min_kept: int = 50_000,
        consistency: bool = False,
        consistency_weights: tuple[float, float, float] = (1.0, 1.0, 0.001),
        delta_v: float = 0.5,
        delta_d: float = 1.5,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        if not 0.0 < ohem_thresh <= 1.0:
            raise ValueError(f"ohem_thresh must be in (0, 1], got {ohem_thresh}")
        if ohem_min_kept < 0:
            raise ValueError(f"ohem_min_kept must be >= 0, got {ohem_min_kept}")
        if len(consistency_weights) != 3 or any(w < 0 for w in consistency_weights):
            raise ValueError(f"consistency_weights must be three values >= 0, got {consistency_weights}")
        if delta_v < 0:
            raise ValueError(f"delta_v must be >= 0, got {delta_v}")
        if delta_d <= delta_v:
            raise ValueError(f"delta_d must be > delta_v={delta_v}, got {delta_d}")
        if class_weights is not None and (
            not all(math.isfinite(w) and w >= 0 for w in class_weights) or not any(class_weights)
        ):
            raise ValueError(f"class_weights must be finite, >= 0 and not all 0, got {list(class_weights)}")
        self.class_weights: Tensor | None
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32),
            persistent=False,
        )
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.ohem = ohem
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept
        self.consistency = consistency
        self.consistency_weights = tuple(consistency_weights)
        self.delta_v = delta_v
        self.delta_d = delta_d

    def extra_repr(self) -> str:
        return (
            f"aux_weight={self.aux_weight}, ignore_index={self.ignore_index}, ohem={self.ohem}, "
            f"ohem_thresh={self.ohem_thresh}, ohem_min_kept={self.ohem_min_kept}, "
            f"consistency={self.consistency}, consistency_weights={self.consistency_weights}, "
            f"delta_v={self.delta_v}, delta_d={self.delta_d}, "
            f"class_weights={None if self.class_weights is None else self.class_weights.tolist()}"
        )

    def forward(self, outputs: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Compute the total loss and its parts.

        Args:
            outputs: ``{"out": (B, K, H', W'), "aux"?: (B, K, H', W'), "embedding"?: (B, E, h, w)}``; logits
                whose size differs from the target's are bilinearly resized to it.
            target: class ids or ``ignore_index``, int64 (B, H, W).

        Returns:
            ``{"loss": total, "main": ...}``, plus ``"aux"`` when the outputs hold it and ``"var"``,
            ``"dis"``, ``"reg"`` (unweighted) with ``consistency`` on. All are scalars attached to the graph.

        Raises:
            ValueError: when ``"out"`` is missing, or ``"embedding"`` is missing with ``consistency`` on.
        """
        if "out" not in outputs:
            raise ValueError(f"outputs has no 'out' logits; keys are {sorted(outputs)}")
        main_logits = _resize_to(outputs["out"], target)
        weight = self.class_weights
        if self.ohem:
            min_kept = self.ohem_min_kept * target.shape[0]  # per image -> per batch
            main = ohem_cross_entropy(
                main_logits, target, self.ohem_thresh, min_kept, self.ignore_index, weight
            )
        else:
            main = cross_entropy(main_logits, target, self.ignore_index, weight)
        losses = {"main": main}
        total = main
        if "aux" in outputs:
            aux_logits = _resize_to(outputs["aux"], target)
            losses["aux"] = cross_entropy(aux_logits, target, self.ignore_index, weight)
            total = total + self.aux_weight * losses["aux"]
        if self.consistency:
            if "embedding" not in outputs:
                raise ValueError(f"consistency=True needs outputs['embedding']; keys are {sorted(outputs)}")
            terms = category_consistent_loss(
                outputs["embedding"], target, self.delta_v, self.delta_d, self.ignore_index
            )
            for name, term_weight in zip(("var", "dis", "reg"), self.consistency_weights, strict=True):
                losses[name] = terms[name]
                total = total + term_weight * terms[name]
        return {"loss": total, **losses}
