"""The main job on the embedded default: generated data -> shards -> CCNet R=2 and R=0 -> multi-scale test.

    python -m jobs.quickstart                 # what `make demo` runs; about 5 minutes on 2 CPU cores

Everything stays on this machine: the shards in runs/datasets, checkpoints in runs/checkpoints (local Ray),
MLflow in runs/mlflow.db. The same recipe with an s3:// storage and a tracking server runs on a cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import interrupts
from pipeline.config import load_config
from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards
from pipeline.eval.results import MULTI_SCALE, SINGLE_SCALE
from pipeline.train.driver import run_training

CONFIG = "configs/quickstart_ccnet-tiny_generated-192x192_cpu.yaml"
DATA_ROOT = "runs/datasets"
VARIANTS = {"CCNet R=2": [], "FCN R=0": ["model.recurrence=0", "run.name=quickstart_ccnet-tiny-r0"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default=CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    interrupts.install()

    source = build_source("generated", None, image_size=(192, 192), counts={"train": 256, "val": 32})
    data_uri, _ = write_shards(source, DATA_ROOT)
    rows = []
    for label, overrides in VARIANTS.items():
        try:
            report = run_training(load_config(args.config, [f"data.uri={data_uri}", *args.set, *overrides]))
        except KeyboardInterrupt:
            logging.getLogger("ccnet").error(
                "interrupted (%s): the quickstart stopped; run it again to resume", interrupts.received()
            )
            return interrupts.exit_status()
        single, multi = report.results[SINGLE_SCALE], report.results[MULTI_SCALE]
        rows.append(f"| {label:<10} | {single.miou:>6.1%} | {multi.miou:>6.1%} | {report.run_id} |")
    hint = report.tracker.browse_hint(experiment_runs=True)
    sys.stdout.write(
        "\nval mIoU on the generated dataset (32 images, 192x192):\n"
        "| model      | single | ms+flip | MLflow run |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"browse the runs: {'.venv/bin/' if hint.startswith('mlflow ui') else ''}{hint}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
