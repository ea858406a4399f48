"""Train a model: ``python -m jobs.train -c CONFIG [--set key=value ...]`` (same as ``ccnet train``)."""

import sys

from pipeline.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
