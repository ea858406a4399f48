"""What the project asks of an experiment tracker (:class:`Tracker`), and the one that records nothing.

Everything that records a run (the driver, the loop's rank 0, searches, ``ccnet evaluate``) takes a
:class:`Tracker` and calls it unconditionally; where tracking is off it gets a :class:`NullTracker`. A second
backend is one new module implementing this protocol (see ``mlflow_tracker.py``), chosen by its URI's scheme
in :func:`pipeline.tracking.open_tracker`: run lookup, the model registry, nesting and descriptions are verbs
of the protocol, so nothing outside ``pipeline/tracking/`` knows which store it talks to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message is one line naming the (redacted) tracking URI."""


class Tracker(Protocol):
    """One tracked run, written from rank 0 only. Once started, no method raises for a store problem."""

    uri: str
    experiment: str

    @property
    def run_id(self) -> str | None:
        """The run id once started (kept after :meth:`end`); None when nothing is recorded."""

    @property
    def active(self) -> bool:
        """True between a successful :meth:`start` and :meth:`end`."""

    def start(
        self,
        run_name: str,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        announce: bool = True,
        *,
        resume: bool = False,
        parent_run_id: str | None = None,
    ) -> str | None:
        """Opens the run: continues ``run_id`` when it exists, or with ``resume`` the latest run named
        ``run_name`` (under ``parent_run_id`` when given), else creates one, nested under ``parent_run_id``.
        Returns its id, or None when not recording. ``announce``: say which run it is on the console (not
        again where another process continues it)."""

    def describe(self, text: str) -> None:
        """The run's description: what it is and its headline results, as the store's UI shows it."""

    def registered_checkpoint(self, model_uri: str, folder: str) -> str:
        """Downloads the training checkpoint of a registered model version (``models:/NAME@alias`` or
        ``models:/NAME/VERSION``) into ``folder``; returns its path. FileNotFoundError when there is none."""

    def browse_hint(self, run_id: str | None = None, experiment_runs: bool = False) -> str:
        """One line telling a user where to look at run ``run_id`` (default: this tracker's), or at its
        experiment's runs."""

    def log_params(self, params: dict[str, object]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> bool: ...

    def settle(self, timeout: float | None = None) -> bool: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_dataset(
        self, name: str, digest: str, source: str, profile: dict[str, Any], context: str
    ) -> None: ...

    def log_dict(self, data: dict, artifact_file: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...

    def log_figure(self, figure: Figure, artifact_file: str) -> None: ...

    def log_model(
        self,
        model: torch.nn.Module,
        name: str = "model",
        registered_name: str | None = None,
        metrics: dict[str, float] | None = None,
        checkpoint: str | None = None,
        version_tags: dict[str, str] | None = None,
        onnx_file: str | None = None,
    ) -> str | None: ...

    def end(self, status: str = "FINISHED") -> None: ...

    def end_children(self, status: str, failed_since: float | None = None) -> int: ...


class NullTracker:
    """Records nothing: ranks other than 0, tracking switched off, a store that was optional and is down."""

    uri = ""
    experiment = ""
    run_id = None
    active = False

    def start(
        self,
        run_name: str,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        announce: bool = True,
        *,
        resume: bool = False,
        parent_run_id: str | None = None,
    ) -> str | None:
        return None

    def describe(self, text: str) -> None:
        pass

    def registered_checkpoint(self, model_uri: str, folder: str) -> str:
        raise FileNotFoundError(f"{model_uri}: no tracking store to look the registered model up in")

    def browse_hint(self, run_id: str | None = None, experiment_runs: bool = False) -> str:
        return "not tracked"

    def log_params(self, params: dict[str, object]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> bool:
        return True

    def settle(self, timeout: float | None = None) -> bool:
        return True

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any], context: str) -> None:
        pass

    def log_dict(self, data: dict, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        pass

    def log_model(
        self,
        model: torch.nn.Module,
        name: str = "model",
        registered_name: str | None = None,
        metrics: dict[str, float] | None = None,
        checkpoint: str | None = None,
        version_tags: dict[str, str] | None = None,
        onnx_file: str | None = None,
    ) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        pass

    def end_children(self, status: str, failed_since: float | None = None) -> int:
        return 0
