"""The rule for a path part joined under a prefix (a run name under ``run.storage``, a shard under its dataset
version): it must stay inside. Storage and config validation both apply it."""

from __future__ import annotations

import os
import re


def stays_inside(part: str) -> bool:
    """False for an empty or absolute part, a URI, or one with a ``..`` component (either slash)."""
    pieces = re.split(r"[/\\]", part)
    absolute = not pieces[0] or os.path.isabs(part)
    return bool(part) and not absolute and "://" not in part and ".." not in pieces
