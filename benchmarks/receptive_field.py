"""How far trained models look: the effective receptive field of their decisions, side by side.

    python benchmarks/receptive_field.py CHECKPOINT [CHECKPOINT ...] [--images 8] [--split val]

For each checkpoint (a file or run folder, local or ``s3://``), on the first ``--images`` images of the
split of the dataset it was trained on (whole images, normalised as it was trained), probed at each image's
centre and at the centres of its four quadrants: within how many input pixels of a pixel lie 50 / 90 / 95 %
of what decides its class (:mod:`ccnet.receptive`), the share from 100 px or farther, and the image's
half-diagonal for scale. When an FCN twin's 95 % radius already spans most of the image, attention has
little left to add; criss-cross attention that engaged shows as mass from farther away than its twin's.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from ccnet.receptive import effective_receptive_field
from pipeline.config import config_from_dict
from pipeline.data.readers import ShardDataset
from pipeline.data.transforms import build_eval_transform
from pipeline.eval.checkpoint import load_checkpoint_model
from pipeline.io import storage
from pipeline.io.checkpoints import load


def measure(checkpoint: str, images: int, split: str | None) -> dict[str, str]:
    state = load(checkpoint)
    config = config_from_dict(state["config"], source=storage.redact(checkpoint))
    model, _, normalization = load_checkpoint_model(config, checkpoint, state["num_classes"])
    dataset = ShardDataset(
        config.data.uri,
        split or config.data.val_split,
        transform=build_eval_transform(normalization.mean, normalization.std),
    )
    batch = torch.stack([dataset[i]["image"] for i in range(min(images, len(dataset)))])
    height, width = batch.shape[-2:]
    points = [(height // 2, width // 2)] + [(height * r // 4, width * c // 4) for r in (1, 3) for c in (1, 3)]
    field = effective_receptive_field(model, batch, points)
    resolved = config.model.resolved()
    return {
        "run": config.run.name,
        "model": config.model.name,
        "R": str(resolved.recurrence),
        "os": str(resolved.output_stride),
        "image": f"{width}x{height}",
        "probes": str(field.probes),
        "r50 (px)": f"{field.radius(0.5):.0f}",
        "r90 (px)": f"{field.radius(0.9):.0f}",
        "r95 (px)": f"{field.radius(0.95):.0f}",
        "beyond 100 px": f"{field.share_beyond(100.0):.3f}",
        "half-diagonal (px)": f"{math.hypot(height, width) / 2:.0f}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--split", help="default: the checkpoint's validation split")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = [measure(checkpoint, args.images, args.split) for checkpoint in args.checkpoints]
    header = list(rows[0])
    lines = [f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
    lines += [f"| {' | '.join(row[key] for key in header)} |" for row in rows]
    sys.stdout.write(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
