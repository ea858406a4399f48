"""Is the attention used? Diagnostics of a model's attention modules on a batch of inputs.

Every attention module returns ``gamma * A(x) + x`` with the learned scalar ``gamma`` starting at 0
(:mod:`ccnet.attention`): while ``gamma`` stays near 0 the model is a plain FCN, whatever ``A`` computes.
:func:`attention_diagnostics` runs the model once and reports, for each attention module:

- ``gamma``;
- ``share``: ``||gamma * A(x)|| / ||x||`` (Frobenius norms over the batch), how much the attention changes the
  features it is given; exactly 0 while ``gamma`` is 0;
- ``entropy``: the mean over pixels of ``-sum_q a_q log a_q`` (nats) of the weights ``a`` a pixel gives the
  value pixels ``q`` it aggregates;
- ``entropy_normalised``: ``entropy / log(number of keys)``: 1.0 is uniform attention, 0 one key; comparable
  across feature-map sizes and attention types (1.0 for a map with a single key);
- ``distance``: the mean over pixels ``p`` of ``sum_q a_q ||p - q||``, Euclidean, in feature pixels.

``A(x)`` is aggregated from the module's ``attention_weights`` (not recovered from the output, which holds
nothing of it while ``gamma`` is 0), and the weights ``a`` are, per pixel:

- criss-cross: the H + W - 1 pixels of its row and column (one softmax); a distance is ``|Δrow|`` or
  ``|Δcol|``;
- axial: the row pass then the column pass composed: pixel (h, w) weighs (j, k) by
  ``column[(h, w), j] * row[(j, w), k]``, over all H * W pixels (entropy by the chain rule, so the composed
  weights are never materialised);
- non-local: all H * W pixels.

With recurrence R a module runs R times, each time on the previous application's output; its figures are the
means over the R applications (each share relative to that application's own input).

Metric names are ``attention/<place>/<figure>``, the place being the first part of the module's path without
``_attention``: ``head`` for ``head.attention.attention``, ``stem`` for ``stem_attention.attention``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ccnet.attention import AxialAttention, CrissCrossAttention, NonLocal2d, _QKVAttention
from ccnet.attention_reference import aggregate

FIGURES = ("gamma", "share", "entropy", "entropy_normalised", "distance")

# The attention counts as engaged once it changes the features it is given by 5 % of their norm. The share is
# the relative size of the attention's term beside the residual path; at one part in twenty it is of the order
# of the perturbations the next layers are trained to absorb (augmentation, batch-norm statistics), so below
# it the head computes essentially what the plain FCN does. A heuristic, for a warning: it sits well above
# what a gamma that stays near its initial 0 gives (shares around 0.001, the tiny model after a few
# iterations), and well below an attention term that is a sizeable part of the features it feeds on.
ENGAGED_SHARE = 0.05


@dataclass(frozen=True)
class _Spread:
    """One application's aggregation and how its attention spreads, per pixel."""

    aggregated: Tensor  # A(x), (B, C, H, W)
    entropy: Tensor  # (B, H, W), nats
    distance: Tensor  # (B, H, W), feature pixels
    keys: int  # pixels each pixel can attend to


def _entropy(weights: Tensor) -> Tensor:
    """``-sum a log a`` over the last dim, with 0 log 0 = 0 (criss-cross's masked centre entry)."""
    return -torch.special.xlogy(weights, weights).sum(-1)


def _offsets(size: int, device: torch.device) -> Tensor:
    """(size, size) float ``|i - j|``."""
    positions = torch.arange(size, device=device, dtype=torch.float32)
    return (positions[:, None] - positions[None, :]).abs()


def _criss_cross(module: CrissCrossAttention, x: Tensor) -> _Spread:
    attention, value = module.attention_weights(x)  # (B, H, W, H + W): column part, then row part
    height, width = x.shape[2:]
    weights = attention.float()
    # column[b, h, w, j] weighs (j, w), |h - j| rows away; row[b, h, w, k] weighs (h, k), |w - k| columns away
    distance = torch.einsum("bhwj,hj->bhw", weights[..., :height], _offsets(height, x.device)) + torch.einsum(
        "bhwk,wk->bhw", weights[..., height:], _offsets(width, x.device)
    )
    return _Spread(aggregate(attention, value), _entropy(weights), distance, height + width - 1)


def _axial(module: AxialAttention, x: Tensor) -> _Spread:
    row, column, value = module.attention_weights(x)  # (B, H, W, W), (B, H, W, H), (B, C, H, W)
    along_rows = torch.einsum("bhwj,bchj->bchw", row, value)
    aggregated = torch.einsum("bhwj,bcjw->bchw", column, along_rows)
    row, column = row.float(), column.float()
    height, width = x.shape[2:]
    # (h, w) weighs (j, k) by column[h, w, j] * row[j, w, k]: H(composed) = H(column) + E_column[H(row)].
    entropy = _entropy(column) + torch.einsum("bhwj,bjw->bhw", column, _entropy(row))
    # reach[b, j, w, d]: the mean distance of the row pass at (j, w) seen from a pixel d rows above or below.
    rows_apart = torch.arange(height, device=x.device, dtype=torch.float32)
    euclidean = torch.hypot(_offsets(width, x.device)[:, :, None], rows_apart)  # (W, W, H): [w, k, d]
    reach = torch.einsum("bjwk,wkd->bjdw", row, euclidean)  # (B, H, H, W): [b, j, d, w]
    target = torch.arange(height, device=x.device).expand(height, height)  # [h, j] -> j
    by_pixel = reach[:, target, _offsets(height, x.device).long()]  # (B, H, H, W): [b, h, j, w]
    distance = torch.einsum("bhwj,bhjw->bhw", column, by_pixel)
    return _Spread(aggregated, entropy, distance, height * width)


def _nonlocal(module: NonLocal2d, x: Tensor) -> _Spread:
    attention, value = module.attention_weights(x)  # (B, HW, HW), (B, C, HW)
    aggregated = torch.bmm(value, attention.transpose(1, 2)).view_as(x)  # (B, C, HW) -> (B, C, H, W)
    batch, _, height, width = x.shape
    rows, columns = torch.meshgrid(
        torch.arange(height, device=x.device), torch.arange(width, device=x.device), indexing="ij"
    )
    pixels = torch.stack([rows.flatten(), columns.flatten()], dim=-1).float()  # (HW, 2), as flatten(2) orders
    weights = attention.float()
    distance = torch.einsum("bij,ij->bi", weights, torch.cdist(pixels, pixels))
    per_pixel = (batch, height, width)
    return _Spread(aggregated, _entropy(weights).view(per_pixel), distance.view(per_pixel), height * width)


def _spread(module: _QKVAttention, x: Tensor) -> _Spread:
    if isinstance(module, CrissCrossAttention):
        return _criss_cross(module, x)
    if isinstance(module, AxialAttention):
        return _axial(module, x)
    if isinstance(module, NonLocal2d):
        return _nonlocal(module, x)
    raise TypeError(f"no diagnostics for {type(module).__name__}: add its attention distribution here")


@torch.no_grad()
def measure(module: _QKVAttention, x: Tensor) -> dict[str, float]:
    """The figures of one application of an attention module to ``x`` (B, C, H, W): ``{figure: value}`` for
    each of :data:`FIGURES` (see the module's docstring)."""
    spread = _spread(module, x)
    gamma = module.gamma.detach().float()
    attended = torch.linalg.vector_norm(gamma * spread.aggregated.float())
    entropy = float(spread.entropy.mean())
    return {
        "gamma": float(gamma),
        "share": float(attended / torch.linalg.vector_norm(x.float())),
        "entropy": entropy,
        "entropy_normalised": entropy / math.log(spread.keys) if spread.keys > 1 else 1.0,
        "distance": float(spread.distance.mean()),
    }


def _places(paths: Sequence[str]) -> dict[str, str]:
    """Each module path's place in metric names (see the module's docstring); the whole path for all of them
    when two would share a place."""
    places = {path: path.split(".")[0].removesuffix("_attention") or "attention" for path in paths}
    if len(set(places.values())) < len(places):
        return {path: path or "attention" for path in paths}
    return places


def _recorder(module: _QKVAttention, applications: list[dict[str, float]]) -> Callable[..., None]:
    """A forward hook on ``module`` that appends the figures of each application to ``applications``."""

    def record(hooked: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        applications.append(measure(module, args[0]))

    return record


@torch.no_grad()
def attention_diagnostics(model: nn.Module, inputs: Tensor) -> dict[str, float]:
    """The figures of every attention module of ``model``, from one forward of ``inputs`` in eval mode.

    Forward hooks on the attention modules see each application, so this works wherever the modules sit and
    whatever their recurrence. The forward runs without autocast, in the model's own precision.

    Args:
        model: any module holding attention modules (of :data:`ccnet.attention.ATTENTION_TYPES`), e.g. a
            CCNet.
        inputs: what ``model`` takes, e.g. (B, 3, H, W) normalised images.

    Returns:
        ``{"attention/<place>/<figure>": value}`` (see the module's docstring); ``{}`` for a model whose
        attention never runs (no attention module, or recurrence 0). Every module's train/eval mode is left
        as it was.
    """
    modules = {path: module for path, module in model.named_modules() if isinstance(module, _QKVAttention)}
    applications: dict[str, list[dict[str, float]]] = {path: [] for path in modules}
    handles = [
        module.register_forward_hook(_recorder(module, applications[path]))
        for path, module in modules.items()
    ]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    places = _places(list(modules))
    return {
        f"attention/{places[path]}/{figure}": statistics.fmean(step[figure] for step in steps)
        for path, steps in applications.items()
        if steps
        for figure in FIGURES
    }


def _by_place(diagnostics: Mapping[str, float], figure: str) -> dict[str, float]:
    """``{place: value}`` of one figure from a :func:`attention_diagnostics` result."""
    return {
        name.split("/")[1]: value
        for name, value in diagnostics.items()
        if name.startswith("attention/") and name.endswith(f"/{figure}")
    }


def never_engaged(history: Sequence[Mapping[str, float]], threshold: float = ENGAGED_SHARE) -> list[str]:
    """The places whose share stayed below ``threshold`` at every point of ``history``.

    Args:
        history: :func:`attention_diagnostics` results over a run, in order.
        threshold: the share at which the attention counts as engaged (:data:`ENGAGED_SHARE`).

    Returns:
        The places, sorted; [] when every place engaged at some point, or there is no attention.
    """
    peaks: dict[str, float] = {}
    for diagnostics in history:
        for place, share in _by_place(diagnostics, "share").items():
            peaks[place] = max(peaks.get(place, share), share)
    return sorted(place for place, peak in peaks.items() if peak < threshold)


def never_engaged_note(
    history: Sequence[Mapping[str, float]], threshold: float = ENGAGED_SHARE
) -> str | None:
    """One line on the places of :func:`never_engaged`, their share and gamma at the end of ``history``, e.g.
    ``attention never engaged: head share 0.003 < 0.05 at the end (gamma 0.004, at most 0.004 over 8
    measurements)``; None when there are none."""
    places = never_engaged(history, threshold)
    if not places:
        return None
    parts = []
    for place in places:
        shares = [d[f"attention/{place}/share"] for d in history if f"attention/{place}/share" in d]
        gammas = [d[f"attention/{place}/gamma"] for d in history if f"attention/{place}/gamma" in d]
        parts.append(
            f"{place} share {shares[-1]:.3g} < {threshold:g} at the end (gamma {gammas[-1]:.3g}, at "
            f"most {max(shares):.3g} over {len(shares)} measurements)"
        )
    return "attention never engaged: " + "; ".join(parts)


__all__ = [
    "ENGAGED_SHARE",
    "FIGURES",
    "attention_diagnostics",
    "measure",
    "never_engaged",
    "never_engaged_note",
]
