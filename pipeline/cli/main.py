"""The ``ccnet`` command line.

    ccnet models                                   # registered model names
    ccnet efficiency                               # the paper's efficiency table (97x97x512 features)
    ccnet efficiency --feature-size 33 --repeats 1 # a quick one
    ccnet data prepare --dataset camvid --root ../shared/data/camvid --out s3://bucket/datasets
    ccnet data prepare --dataset generated --out ./runs/datasets --count train=200,val=50
    ccnet data inspect s3://bucket/datasets/camvid/v1 --grid camvid.png

Training: ``ccnet train|tune|ablation`` (below); a trained model: ``ccnet evaluate|predict|export``
(``pipeline/cli/models.py``); a Ray cluster's Jobs API:
``ccnet submit|jobs|schedule`` (``pipeline/cli/jobs.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from pipeline import interrupts
from pipeline.cli.args import at_least
from pipeline.cli.data import add_data_commands
from pipeline.cli.jobs import add_job_commands
from pipeline.cli.models import add_model_commands
from pipeline.config import load_config
from pipeline.io import redaction
from pipeline.io.errors import user_message
from pipeline.io.redaction import redact

log = logging.getLogger("ccnet")


# torch and the model library are imported by the commands that use them: `ccnet data`, `ccnet submit` and
# `ccnet jobs` start in a fraction of the time.


def _models(args: argparse.Namespace) -> int:
    # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)
    from ccnet import list_models

    sys.stdout.write("\n".join(list_models()) + "\n")
    return 0


def _efficiency(args: argparse.Namespace) -> int:
    import torch  # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)

    from ccnet import list_models
    from ccnet.profiling import compare_attention, format_table, model_summary

    if args.model not in list_models():
        raise ValueError(f"--model {args.model!r} is not a registered model (see `ccnet models`)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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


def _train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)  # a bad config is refused before torch loads

    # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)
    from pipeline.train.driver import run_training

    report = run_training(config)
    sys.stdout.write(
        f"\n{report.table}\n\nbest checkpoint: {redact(report.best_checkpoint)}\n"
        f"tracked run {report.run_id} at {redact(report.tracking_uri)}\n"
        f"browse it: {report.tracker.browse_hint()}\n"
    )
    return 0


def _tune(args: argparse.Namespace) -> int:
    # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)
    from pipeline.train.tune import run_search

    report = run_search(load_config(args.config, args.set))
    sys.stdout.write(
        f"\n{report.table}\n\nbest: {report.best} ({report.best_value:.4f})\n"
        f"MLflow parent run {report.parent_run_id}\n"
    )
    if report.ablation is not None:  # what the parent run holds as ablation/results.md
        sys.stdout.write(f"\nablation (val mIoU: mean ± 95 % interval over seeds):\n{report.ablation}\n")
    return 0


def _ablation(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)  # a bad config is refused before torch and Ray load

    from pipeline.train.report import study_report  # lazy, as above

    report = study_report(config, args.search)
    searches = ", ".join(f"{name} ({count} trials)" for name, count in report.searches.items())
    sys.stdout.write(
        f"ablation of {searches} (val mIoU: mean ± 95 % interval over seeds):\n{report.table}\n\n"
        f"val IoU per class (%, single / ms+flip, paired single-scale difference in brackets):\n"
        f"{report.per_class}\n"
    )
    return 0


def _add_training_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model (Ray Train, MLflow) and evaluate it")
    train.add_argument("-c", "--config", help="YAML config (see configs/); defaults otherwise")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.lr=0.02")
    train.set_defaults(run=_train)

    tune = commands.add_parser("tune", help="Ray Tune search (ASHA) or ablation grid over the training job")
    tune.add_argument("-c", "--config", help="YAML config with a tune section")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="tune.num_samples=8")
    tune.set_defaults(run=_tune)

    report = commands.add_parser(
        "ablation", help="the ablation table of finished searches, gathered as one study"
    )
    report.add_argument("-c", "--config", help="the ablation's YAML config (variants, baseline, run.storage)")
    report.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="tune.baseline=cc_r2")
    report.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="NAME",
        help="a search (tune.name) under run.storage to gather; repeat it; default: the config's tune.name",
    )
    report.set_defaults(run=_ablation)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors look like every other error: one line, ``ERROR ...``, exit status 2.

    Subcommand parsers are of the same class (argparse makes them with ``type(parent)``).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ERROR {self.prog}: {redact(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ccnet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(run=_models)

    efficiency = commands.add_parser("efficiency", help="FLOPs / memory / time of the attention modules")
    efficiency.add_argument(
        "--feature-size", type=at_least(1), default=97, help="feature map side (97 = 769 / 8)"
    )
    efficiency.add_argument("--channels", type=at_least(8), default=512)
    efficiency.add_argument("--batch", type=at_least(1), default=1)
    efficiency.add_argument("--repeats", type=at_least(1), default=2, help="timed forward+backward passes")
    efficiency.add_argument("--device", help="default: cuda when available, else cpu")
    efficiency.add_argument("--model", default="ccnet_r101_deepstem_d8", help="a name from `ccnet models`")
    efficiency.add_argument("--num-classes", type=at_least(1), default=19)
    efficiency.set_defaults(run=_efficiency)

    add_data_commands(commands)
    _add_training_commands(commands)
    add_model_commands(commands)
    add_job_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    redaction.remember(argv)  # whatever quotes a credential given here, whole or in part, prints it redacted
    # What follows "--" belongs to the submitted job (argparse cannot mix it with the job's name).
    job_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = build_parser()
    args = parser.parse_args(argv[: len(argv) - len(job_args) - 1] if "--" in argv else argv)
    if job_args and args.command not in ("submit", "schedule"):
        parser.error("arguments after -- are for `ccnet submit` and `ccnet schedule` only")
    args.job_args = job_args
    level = logging.DEBUG if args.debug else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(redaction.RedactingFilter())
    interrupts.install()  # Ctrl-C: the command stops its way, or by force after 30 s
    try:
        return args.run(args)
    except KeyboardInterrupt:
        # One line; the run's MLflow record is KILLED, and the same command resumes from its last checkpoint.
        log.error(
            "interrupted (%s): %s stopped; the same command resumes it", interrupts.received(), args.command
        )
        return interrupts.exit_status()
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        if args.debug:
            raise
        log.error("%s", user_message(error))
        return 2


if __name__ == "__main__":
    sys.exit(main())
