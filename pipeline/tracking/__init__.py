"""Experiment tracking: the only package of the project that imports ``mlflow``.

``base`` holds the :class:`Tracker` protocol every caller uses and :class:`NullTracker` for where tracking is
off; ``mlflow_tracker`` the MLflow implementation; ``buffer`` what waits in memory through an outage;
``mlflow_store`` lookups by name (a run to resume, a registered model's checkpoint); ``uri`` the tracking
URI and the store's probe. A second backend is one new module implementing ``base.Tracker``, its URI scheme
added to :data:`BACKENDS`; nothing outside this package changes (``tests/pipeline/tracking/test_backends.py``
trains and evaluates with one that writes JSON lines).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.tracking.base import NullTracker, Tracker, TrackingError
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.uri import resolve_tracking_uri

__all__ = [
    "BACKENDS",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "open_tracker",
    "resolve_tracking_uri",
]

# The URI schemes of trackers other than MLflow's, which takes every other URI (http(s), sqlite, databricks,
# ...). Each is called as ``Backend(uri, experiment, required=..., settle_timeout=...)``.
BACKENDS: dict[str, Callable[..., Tracker]] = {}


def open_tracker(
    uri: str | None, experiment: str, *, required: bool = True, settle_timeout: float = 120.0
) -> Tracker:
    """The tracker for ``uri``: the backend of its scheme (:data:`BACKENDS`, else MLflow), or a
    :class:`NullTracker` when there is no URI."""
    if not uri:
        return NullTracker()
    backend = BACKENDS.get(uri.partition("://")[0], MlflowTracker)
    return backend(uri, experiment, required=required, settle_timeout=settle_timeout)
