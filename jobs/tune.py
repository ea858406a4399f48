"""Hyper-parameter search: ``python -m jobs.tune -c CONFIG [--set tune.num_samples=8 ...]``."""

import sys

from pipeline.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
