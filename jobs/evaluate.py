"""Evaluate a checkpoint single-scale and multi-scale + flip: ``python -m jobs.evaluate --checkpoint URI``."""

import sys

from pipeline.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
