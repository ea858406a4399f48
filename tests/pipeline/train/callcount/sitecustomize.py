"""Counts, in every process of a run (driver, Tune trials, Ray Train workers), the decisions a run should make
once: each call of a counted function appends ``<name> <pid>`` to the file ``$CCNET_CALL_LOG``.

Put on ``PYTHONPATH`` by ``tests/pipeline/train/test_run_spec.py``: Python imports ``sitecustomize`` at
start-up, and an import hook wraps the counted functions as soon as their module is loaded, before any other
module imports them by name. Ray's workers inherit the driver's environment, this folder on their path
included. Nothing is imported here: each process loads the project from where it would anyway."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any

_LOG = os.environ.get("CCNET_CALL_LOG")
# module -> (object in it, attribute, counted name)
_COUNTED = {
    "pipeline.tracking.uri": (None, "resolve_tracking_uri", "resolve_tracking_uri"),
    "pipeline.data.schema": ("Manifest", "from_json", "manifest_read"),
    "pipeline.train.resources": (None, "connect", "ray_connect"),
}


def _record(name: str) -> None:
    with open(_LOG, "a", encoding="utf-8") as file:  # type: ignore[arg-type]
        file.write(f"{name} {os.getpid()}\n")


def _wrap(module: Any) -> None:
    owner_name, attribute, name = _COUNTED[module.__name__]
    owner = getattr(module, owner_name) if owner_name else module
    original = owner.__dict__[attribute]
    function = original.__func__ if isinstance(original, classmethod) else original

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _record(name)
        return function(*args, **kwargs)

    setattr(owner, attribute, classmethod(wrapper) if isinstance(original, classmethod) else wrapper)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _wrap(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _COUNTED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


if _LOG:
    sys.meta_path.insert(0, _Finder())
