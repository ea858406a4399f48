"""Prepare a dataset into shards: ``python -m jobs.prepare_data --dataset NAME --root PATH --out URI``."""

import sys

from pipeline.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
