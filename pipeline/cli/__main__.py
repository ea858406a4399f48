"""``python -m pipeline.cli``: the ``ccnet`` command."""

import sys

from pipeline.cli.main import main

sys.exit(main())
