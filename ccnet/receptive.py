"""How far a segmentation model looks: the effective receptive field of its decisions (Luo et al., NeurIPS
2016, "Understanding the Effective Receptive Field in Deep Convolutional Neural Networks").

Attention can only add what the convolutions do not already see. For a pixel ``p`` of an image, the model's
decision there is the log-probability of the class it predicts, ``log softmax(out[:, p])[argmax]``; how much
each input pixel ``q`` moves it is ``sum_c |d decision / d x[c, q]|``. :func:`effective_receptive_field`
collects that mass by the distance ``||p - q||`` (Euclidean, input pixels) over the probed pixels of a
batch, each probe's mass normalised to 1, so that :meth:`ReceptiveField.radius` answers "within how many
pixels of ``p`` lies 50 % / 95 % of what decides ``p``" and :meth:`ReceptiveField.share_beyond` the share
from farther than a distance. A pure convolution stack has a hard bound (its theoretical receptive field)
and a much smaller effective one; criss-cross attention with R=2 reaches every pixel of the map.

    field = effective_receptive_field(model, images)            # probes the centre of every image
    field.radius(0.95), field.share_beyond(100.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ReceptiveField:
    """Gradient mass by distance from the probed pixel: ``mass[d]`` is the mean over probes of the share
    of a probe's mass at distances in ``[d, d + 1)`` input pixels (it sums to 1)."""

    mass: Tensor  # (D,) float64
    probes: int

    def radius(self, share: float) -> float:
        """The smallest whole number of input pixels ``r`` such that ``share`` of the mass lies at distances
        below ``r`` (a 3x3 convolution's decisions: all of it below 2, its corners being 1.41 away)."""
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {share}")
        cumulative = torch.cumsum(self.mass, 0)
        index = int(torch.searchsorted(cumulative, torch.tensor(share - 1e-12, dtype=cumulative.dtype)))
        return float(min(index, len(self.mass) - 1) + 1)

    def share_beyond(self, distance: float) -> float:
        """The share of the mass at ``distance`` input pixels or farther (bins from ``floor(distance)``)."""
        start = max(0, int(distance))
        return float(self.mass[start:].sum())


def effective_receptive_field(
    model: nn.Module, images: Tensor, points: Sequence[tuple[int, int]] | None = None
) -> ReceptiveField:
    """The effective receptive field of ``model``'s decisions on ``images`` (B, 3, H, W), already
    normalised as the model expects, probed at ``points`` ((row, col) of the input; default the centre).

    ``model`` returns logits ``out`` (B, K, H, W) at the input size, or a dict holding them under ``"out"``
    (CCNet's models); it is used as it is (put it in eval mode first, as for inference). One backward pass
    per point; each image and point is one probe.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    points = list(points) if points is not None else [(height // 2, width // 2)]
    for row, col in points:
        if not (0 <= row < height and 0 <= col < width):
            raise ValueError(f"point {(row, col)} is outside the {height}x{width} images")
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    bins = int((height**2 + width**2) ** 0.5) + 1
    mass = torch.zeros(bins, dtype=torch.float64)
    probes = 0
    for row, col in points:
        x = images.detach().clone().requires_grad_(True)
        out = model(x)
        logits = out["out"] if isinstance(out, dict) else out
        if logits.shape[-2:] != (height, width):
            raise ValueError(f"logits are {tuple(logits.shape[-2:])}, not the input's {(height, width)}")
        log_probs = torch.log_softmax(logits[:, :, row, col].float(), dim=1)  # (B, K)
        decision = log_probs.gather(1, log_probs.argmax(1, keepdim=True)).sum()
        (gradient,) = torch.autograd.grad(decision, x)
        per_pixel = gradient.abs().sum(1).double()  # (B, H, W)
        distance = torch.sqrt((rows - row) ** 2 + (cols - col) ** 2).long().flatten()  # (H * W,)
        for image_mass in per_pixel.flatten(1):
            total = image_mass.sum()
            if total > 0:
                mass += torch.bincount(distance, weights=image_mass / total, minlength=bins)
                probes += 1
    if probes == 0:
        raise ValueError("the decisions do not depend on the input (every gradient is 0)")
    return ReceptiveField(mass / probes, probes)
