"""The ``ccnet`` command line.

    ccnet models                                   # registered model names
    ccnet efficiency                               # the paper's efficiency table (97x97x512 features)
    ccnet efficiency --feature-size 33 --repeats 1 # a quick one
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from ccnet import list_models
from ccnet.profiling import compare_attention, format_table, model_summary

log = logging.getLogger("ccnet")


def _models(args: argparse.Namespace) -> int:
    sys.stdout.write("\n".join(list_models()) + "\n")
    return 0


def _efficiency(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    size = (args.feature_size, args.feature_size)
    log.info("profiling attention modules on %s features of %s, %s channels", size, device, args.channels)
    rows = compare_attention(size, args.channels, args.batch, device=device, repeats=args.repeats)
    sys.stdout.write(
        f"Attention modules, batch {args.batch}, {args.channels}x{size[0]}x{size[1]} features, "
        f"{device.type}, float32 (ratios to non-local):\n{format_table(rows, 'non-local')}\n\n"
    )
    image = (args.feature_size - 1) * 8 + 1  # output stride 8: 97x97 features come from 769x769 images
    sys.stdout.write(model_summary(args.model, args.num_classes, (image, image)) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccnet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(run=_models)

    efficiency = commands.add_parser("efficiency", help="FLOPs / memory / time of the attention modules")
    efficiency.add_argument("--feature-size", type=int, default=97, help="feature map side (97 = 769 / 8)")
    efficiency.add_argument("--channels", type=int, default=512)
    efficiency.add_argument("--batch", type=int, default=1)
    efficiency.add_argument("--repeats", type=int, default=2, help="timed forward+backward passes")
    efficiency.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    efficiency.add_argument("--model", default="ccnet_r101_deepstem_d8", choices=list_models())
    efficiency.add_argument("--num-classes", type=int, default=19)
    efficiency.set_defaults(run=_efficiency)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        if args.debug:
            raise
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
