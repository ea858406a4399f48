"""Experiment tracking: the only package of the project that imports ``mlflow``.

``base`` holds the :class:`Tracker` protocol every caller uses and :class:`NullTracker` for where tracking is
off; ``mlflow_tracker`` the MLflow implementation; ``buffer`` what waits in memory through an outage;
``mlflow_store`` lookups by name (a run to resume, a registered model's checkpoint); ``uri`` the tracking
URI and the store's probe. A second backend is one new module implementing ``base.Tracker``, chosen in
:func:`open_tracker`.
"""

from __future__ import annotations

from pipeline.tracking.base import NullTracker, Tracker, TrackingError
from pipeline.tracking.mlflow_store import browse_hint, context_tags, find_run, registered_checkpoint
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.uri import resolve_tracking_uri

__all__ = ["MlflowTracker", "NullTracker", "Tracker", "TrackingError", "browse_hint", "context_tags",
           "find_run", "open_tracker", "registered_checkpoint", "resolve_tracking_uri"]


def open_tracker(uri: str | None, experiment: str, *, required: bool = True,
                 settle_timeout: float = 120.0) -> Tracker:
    """The tracker for a run: MLflow at ``uri``, or a :class:`NullTracker` when there is no URI."""
    if not uri:
        return NullTracker()
    return MlflowTracker(uri, experiment, required=required, settle_timeout=settle_timeout)
