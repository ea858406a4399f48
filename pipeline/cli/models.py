"""The commands that use a trained model: ``ccnet evaluate``, ``ccnet predict`` and ``ccnet export``.

    ccnet evaluate --checkpoint runs/x/checkpoints/best/checkpoint.pt --split test
    ccnet predict frame.png --checkpoint models:/ccnet-camvid@champion --out predictions/
    ccnet export --checkpoint models:/ccnet-camvid@champion --out ccnet-camvid.onnx
    ccnet predict frame.png --checkpoint ccnet-camvid.onnx --out predictions/  # onnxruntime

A checkpoint is a local path, an s3:// URI or a registered model (``models:/NAME@ALIAS``, whose stored
checkpoint is read with ``weights_only=True``); its saved config applies, ``--set`` changes it. ``predict
--backend onnx`` runs onnxruntime: on an exported ``.onnx`` file, or on a checkpoint exported first.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.cli.args import checkpoint, local_folder
from pipeline.config import Config, apply_overrides, config_from_dict
from pipeline.io.redaction import redact
from pipeline.tracking import open_tracker, resolve_tracking_uri

log = logging.getLogger("ccnet")


def _config_from_checkpoint(args: argparse.Namespace) -> tuple[Config, dict]:
    """The checkpoint's saved config with ``--set`` applied, and its state. A registered model's checkpoint
    is downloaded first (``args.checkpoint`` then names the local copy, removed when the command ends)."""
    # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)
    from pipeline.data.readers import open_manifest
    from pipeline.io.checkpoints import load
    from pipeline.train.identity import check_checkpoint, checkpoint_identity

    if args.checkpoint.startswith("models:/"):
        folder = tempfile.mkdtemp(prefix="ccnet-model-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        registry = open_tracker(resolve_tracking_uri(None), experiment="")
        args.checkpoint = registry.registered_checkpoint(args.checkpoint, folder)
    state = load(args.checkpoint)
    source = f"{redact(args.checkpoint)} config"
    saved = config_from_dict(state.get("config") or {}, source=source)
    config = config_from_dict(apply_overrides(state.get("config") or {}, args.set or []), source=source)
    try:
        classes = open_manifest(config.data.uri).classes
    except (OSError, ValueError):
        classes = None  # predict on a machine without the dataset; evaluate fails on it next, naming it
    check_checkpoint(checkpoint_identity(state, saved), config, classes, args.checkpoint)
    return config, state


def _evaluate(args: argparse.Namespace) -> int:
    # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)
    from pipeline.eval.checkpoint import evaluate_checkpoint
    from pipeline.eval.results import protocol_table
    from pipeline.io.checkpoints import tracking_run_id
    from pipeline.train.context import start_tracker

    config, state = _config_from_checkpoint(args)
    _, _, results = evaluate_checkpoint(config, args.checkpoint, split=args.split)
    table = protocol_table(results)
    sys.stdout.write(table + "\n")
    if (run_id := tracking_run_id(state)) and not args.no_tracking:
        tracker = start_tracker(
            config, resolve_tracking_uri(config.tracking.uri), config.run.name, run_id=run_id, required=False
        )
        prefix = "" if args.split in (None, config.data.val_split) else f"{args.split}_"  # val: unprefixed
        tracker.log_text(table, f"evaluation/{prefix}iteration_{state['iteration']:07d}.md")
        tracker.end()
    return 0


def _manifest(config: Config) -> Any:
    """The dataset's manifest when it is reachable (its classes and palette), else None."""
    # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)
    from pipeline.data.readers import open_manifest

    try:
        return open_manifest(config.data.uri)
    except (OSError, ValueError):
        return None


def _palette(config: Config, num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """The dataset's palette when its manifest is reachable, else a fixed spread of colours."""
    manifest = _manifest(config)
    return manifest.palette if manifest is not None else default_palette(num_classes)


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(((37 * i) % 256, (101 * i) % 256, (173 * i) % 256) for i in range(num_classes))


def _checkpoint_model(config: Config, state: dict, source: str) -> tuple[Any, Any]:
    """The checkpoint's model in eval mode, and the input normalisation it was trained with."""
    # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)
    from pipeline.config.model import build_model
    from pipeline.io.checkpoints import checkpoint_normalization, load_model_state

    model = build_model(config, state["num_classes"], pretrained=False)
    load_model_state(model, state, redact(source))
    return model.eval(), checkpoint_normalization(state, model)


def _export_to(config: Config, state: dict, source: str, out: str) -> Any:
    """Exports the checkpoint to ``out``; returns the parity report."""
    # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)
    from pipeline.eval.onnx import export_checkpoint, onnx_metadata
    from pipeline.train.record import variant_label

    model, normalization = _checkpoint_model(config, state, source)
    manifest = _manifest(config)
    metadata = onnx_metadata(
        config,
        normalization,
        state["num_classes"],
        variant=variant_label(config),
        classes=manifest.classes if manifest else None,
        palette=manifest.palette if manifest else None,
    )
    return export_checkpoint(model, out, metadata)


def _check_onnx_target(out: str) -> None:
    """``--out`` may replace only an ONNX file that ``ccnet export`` wrote."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out}: is a folder; give the .onnx file to write")
    if path.exists():
        try:
            import onnx

            written_by_ccnet = any(
                p.key == "ccnet.model" for p in onnx.load(out, load_external_data=False).metadata_props
            )
        except Exception:
            written_by_ccnet = False
        if not written_by_ccnet:
            raise ValueError(f"--out {out}: exists and is not an ONNX model ccnet exported; not replaced")


def _export(args: argparse.Namespace) -> int:
    _check_onnx_target(args.out)
    config, state = _config_from_checkpoint(args)
    report = _export_to(config, state, args.checkpoint, args.out)
    log.info("%s", report)
    sys.stdout.write(f"{args.out}\n")
    return 0


def _predict(args: argparse.Namespace) -> int:
    # lazy: loaded only by this command (`ccnet --help` imports neither torch nor Ray)
    from pipeline.eval.evaluation import EvalProtocol
    from pipeline.eval.onnx import open_onnx
    from pipeline.eval.predict import predict_images

    onnx_file = args.checkpoint.endswith(".onnx")
    if onnx_file and args.backend == "torch":
        raise ValueError(f"--checkpoint {args.checkpoint}: an ONNX file runs with --backend onnx")
    if onnx_file and args.set:
        raise ValueError("--set changes a checkpoint's config; an ONNX file's protocol is fixed at export")
    if onnx_file or args.backend == "onnx":
        if not onnx_file:  # a checkpoint: exported first, into a file removed when the command ends
            config, state = _config_from_checkpoint(args)
            folder = tempfile.mkdtemp(prefix="ccnet-onnx-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            log.info("%s", _export_to(config, state, args.checkpoint, str(Path(folder) / "model.onnx")))
            args.checkpoint = str(Path(folder) / "model.onnx")
        exported = open_onnx(args.checkpoint)
        model, normalization = exported.segmenter, exported.normalization
        protocol = EvalProtocol.from_dict(exported.protocol)
        palette = exported.palette or default_palette(exported.num_classes)
    else:
        config, state = _config_from_checkpoint(args)
        model, normalization = _checkpoint_model(config, state, args.checkpoint)
        palette = _palette(config, state["num_classes"])
        protocol = EvalProtocol.multi_scale(config.eval)
    written = predict_images(
        model,
        [Path(p) for p in args.images],
        palette=palette,
        out_dir=Path(args.out),
        normalization=normalization,
        protocol=protocol if args.multi_scale else protocol.at_single_scale(),
        num_classes=len(palette),
    )
    sys.stdout.write("\n".join(str(path) for path in written) + "\n")
    return 0


def add_model_commands(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("evaluate", help="single-scale vs multi-scale + flip mIoU of a checkpoint")
    evaluate.add_argument(
        "--checkpoint", required=True, type=checkpoint, help="checkpoint.pt (local path or s3:// URI)"
    )
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="eval.mode=slide")
    evaluate.add_argument("--split", help="the split to evaluate, e.g. test (default: data.val_split)")
    evaluate.add_argument("--no-tracking", action="store_true", help="do not record the table in MLflow")
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser("predict", help="coloured masks and overlays for images")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument(
        "--checkpoint",
        required=True,
        type=checkpoint,
        help="local path, s3:// URI, models:/NAME@ALIAS, or an exported .onnx file",
    )
    predict.add_argument("--out", required=True, type=local_folder, help="output folder")
    predict.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default=None,
        help="PyTorch (default) or onnxruntime (default for a .onnx file)",
    )
    predict.add_argument("--multi-scale", action="store_true", help="use eval.scales and flip")
    predict.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    predict.set_defaults(run=_predict)

    export = commands.add_parser("export", help="an ONNX model (dynamic batch and size) of a checkpoint")
    export.add_argument(
        "--checkpoint", required=True, type=checkpoint, help="local path, s3:// URI or models:/NAME@ALIAS"
    )
    export.add_argument("--out", required=True, type=local_folder, help="the .onnx file to write")
    export.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="eval.mode=slide")
    export.set_defaults(run=_export)
