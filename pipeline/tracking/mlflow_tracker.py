"""Experiment tracking on MLflow: the :class:`~pipeline.tracking.base.Tracker` the project runs with.

One MLflow run per training run, written by rank 0 through an ``MlflowClient`` bound to an explicit tracking
URI and the run's id (no fluent ``mlflow.start_run`` state), so that the run id can travel through the train
loop's config and a resumed job continues the same run::

    tracker = MlflowTracker(resolve_tracking_uri(config.tracking.uri), config.tracking.experiment,
                            required=config.tracking.required)
    run_id = tracker.start(config.run.name, run_id=previous_run_id)  # None: a new run
    tracker.log_params(config.flat())
    tracker.log_metrics({"train/loss": loss}, step=iteration)
    tracker.end()

A server that cannot be reached at ``start`` is fatal (:class:`TrackingError`) when tracking is required, else
the tracker turns into a no-op. Once started, tracking never fails the training: during an outage metrics
(and params) wait in an :class:`~pipeline.tracking.buffer.OutageBuffer` and are sent, in order and with their
original steps and times, by the next call that gets through or by :meth:`MlflowTracker.end`; artifacts
logged during an outage are dropped with a warning. Credentials never reach MLflow params or log messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

from pipeline.interrupts import on_forced_exit
from pipeline.io.redaction import holds_secret, redact
from pipeline.tracking.base import TrackingError
from pipeline.tracking.buffer import OutageBuffer
from pipeline.tracking.mlflow_models import log_models
from pipeline.tracking.mlflow_store import (
    ARTIFACT_HTTP,
    LOG_HTTP,
    PROBE_HTTP,
    browse_hint,
    context_tags,
    end_nested_runs,
    ensure_experiment,
    find_run,
    import_mlflow,
    is_permanent,
    last_steps,
    registered_checkpoint,
    resumable_run,
    safe_value,
)
from pipeline.tracking.uri import answers, env, one_line

PARENT_TAG = "mlflow.parentRunId"  # a nested run's parent (the MLflow UI nests it under that run)
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI

log = logging.getLogger(__name__)


class MlflowTracker:
    """One MLflow run, written from rank 0 only.

    Args:
        uri: tracking URI (:func:`resolve_tracking_uri`); may hold credentials, which are never logged.
        experiment: experiment name, created when missing.
        required: at :meth:`start`, an unusable store raises :class:`TrackingError` (True) or turns this
            tracker into a no-op with a warning (False).
        settle_timeout: how long :meth:`settle` and :meth:`end` wait, during an outage, for the store to
            answer again before what it has not received is given up (seconds).

    Attributes:
        uri: the tracking URI.
        experiment: the experiment name.
        required: see above.
    """

    def __init__(
        self, uri: str, experiment: str, required: bool = True, settle_timeout: float = 120.0
    ) -> None:
        self.uri = uri
        self.experiment = experiment
        self.required = required
        self.settle_timeout = settle_timeout
        self._client: Any = None
        self._experiment_id: str | None = None
        self._run_id: str | None = None
        self._ended = False
        self._buffer = OutageBuffer()
        self._outage = False
        self._lock = threading.Lock()  # the caller's threads, and the forced-exit watchdog's (interrupts)
        self._unregister: Callable[[], None] = lambda: None

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once started (kept after :meth:`end`); None for a no-op tracker."""
        return self._run_id

    @property
    def active(self) -> bool:
        """True between a successful :meth:`start` and :meth:`end`."""
        return self._run_id is not None and not self._ended

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
        """Opens the run: continues ``run_id`` when given and it exists, or with ``resume`` the latest run
        named ``run_name`` (nested under ``parent_run_id`` when given: :func:`find_run`), else creates one,
        nested under ``parent_run_id`` (MLflow's ``mlflow.parentRunId`` tag).

        The store is checked first (an HTTP server's ``/health`` within a second, then the experiment with
        a 5 s timeout and no retries), so a dead server fails before any training work. ``announce``
        logs which run it is at INFO (else at DEBUG: a process continuing a run the driver announced).

        Returns:
            The run id; None when the store is unusable and tracking is not required (the tracker is then
            a no-op).

        Raises:
            TrackingError: the store is unusable and ``required`` is True.
            RuntimeError: the tracker was started before.
        """
        if self._run_id is not None or self._ended:
            raise RuntimeError("Tracker.start called twice")
        mlflow = import_mlflow()
        from mlflow.entities import RunTag  # lazy: MLflow (2 s to import) loads only where a run is tracked

        if run_id is None and resume:
            run_id = find_run(self.uri, self.experiment, run_name, parent_run_id)
        if parent_run_id is not None:
            tags = {PARENT_TAG: parent_run_id, **(tags or {})}
        safe_tags = {key: safe_value(key, value) for key, value in (tags or {}).items()}
        # A run that exists (run_id: the driver created it moments ago) meets an outage, not a wrong URI: the
        # store gets settle_timeout to answer again, or the run's metrics would be lost for good.
        deadline = time.monotonic() + (self.settle_timeout if run_id else 0.0)
        while True:
            try:
                if not answers(self.uri):
                    raise ConnectionError("no answer from /health")
                with env(PROBE_HTTP):
                    client = mlflow.MlflowClient(tracking_uri=self.uri)
                    experiment_id = ensure_experiment(client, self.experiment, self.uri)
                    run = resumable_run(client, run_id, self.uri) if run_id else None
                    if run is None:
                        run = client.create_run(
                            experiment_id, run_name=run_name, tags={**context_tags(), **safe_tags}
                        )
                    else:
                        client.update_run(run.info.run_id, status="RUNNING")
                        if safe_tags:
                            client.log_batch(
                                run.info.run_id, tags=[RunTag(k, v) for k, v in safe_tags.items()]
                            )
                        self._buffer.stored_params = dict(run.data.params)
                        self._buffer.logged_through = last_steps(client, run)
                break
            except Exception as error:
                message = f"MLflow tracking at {redact(self.uri)} is unusable: {one_line(error)}"
                if time.monotonic() < deadline:
                    log.warning(
                        "%s; waiting for it to answer (up to %.0f s)", message, deadline - time.monotonic()
                    )
                    time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
                    continue
                if self.required:
                    raise TrackingError(message) from None  # the chained error may quote credentials
                log.warning("%s; going on without tracking", message)
                self._ended = True
                return None
        self._client, self._experiment_id, self._run_id = client, experiment_id, run.info.run_id
        self._unregister = on_forced_exit(self._mark_killed)  # a Ctrl-C whose shutdown hangs
        log.log(
            logging.INFO if announce else logging.DEBUG,
            "MLflow run %s (%s) in experiment %r at %s",
            self._run_id,
            run_name,
            self.experiment,
            redact(self.uri),
        )
        return self._run_id

    def log_params(self, params: dict[str, object]) -> None:
        """Records params: values as strings (cut to 6000 characters), secrets redacted (see :func:`redact`;
        keys naming a secret get ``***``). A param the run already holds with the same value is skipped; with
        another value it is skipped with a warning, since MLflow never changes a param."""
        if not self.active:
            return
        with self._lock:
            self._buffer.add_params({key: safe_value(key, value) for key, value in params.items()})
            self._flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Records metric values at ``step`` (timestamped now). Never raises for a store problem: during an
        outage the points wait in memory (the newest 100,000) for the next call that gets through. The call
        that meets the outage waits at most ~10 s (a silent host), later ones at most ~1 s (the probe)."""
        if not self.active:
            return
        with self._lock:
            self._buffer.add_metrics(metrics, step, int(time.time() * 1000))
            self._flush()

    def flush(self) -> bool:
        """Sends what waits in memory now; True when nothing is left waiting."""
        if not self.active:
            return True
        with self._lock:
            return self._flush()

    def _flush(self) -> bool:
        """Sends pending params, then buffered metrics in order; keeps whatever did not get through.
        The caller holds the lock."""
        # lazy: MLflow (2 s to import) loads only where a run is tracked
        from mlflow.entities import Metric, Param

        if self._buffer.empty:
            return True
        if self._outage and not answers(self.uri):
            return False  # a refused or black-holed server costs at most one second per call
        try:
            with env(LOG_HTTP):
                self._buffer.drain(
                    lambda params: self._send("params", params=[Param(k, v) for k, v in params.items()]),
                    lambda points: self._send("metrics", metrics=[Metric(*point) for point in points]),
                )
        except Exception as error:
            self._note_outage(error)
            return False
        if self._outage:
            self._outage = False
            dropped = self._buffer.dropped
            lost = f"; the {dropped} oldest metric points were dropped" if dropped else ""
            log.warning("MLflow at %s answers again; buffered metrics sent%s", redact(self.uri), lost)
            self._buffer.dropped = 0
        return True

    def settle(self, timeout: float | None = None) -> bool:
        """Waits, during an outage, until the store answers again and holds everything buffered, for at most
        ``timeout`` s (default: ``settle_timeout``). Called before a run's final artifacts and at its end, so
        that an outage near the end loses nothing. Returns True when nothing is left waiting."""
        if not self.active:
            return True
        deadline = time.monotonic() + (self.settle_timeout if timeout is None else timeout)
        waited = False
        while True:
            with self._lock:
                if self._flush() and (not self._outage or answers(self.uri)):
                    if self._outage:  # back, with nothing left to send
                        self._outage = False
                        log.warning("MLflow at %s answers again", redact(self.uri))
                    return True
            if time.monotonic() >= deadline:
                return False
            if not waited:
                waited = True
                log.warning(
                    "waiting up to %.0f s for MLflow at %s to answer again",
                    deadline - time.monotonic(),
                    redact(self.uri),
                )
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def _send(self, what: str, **batch: list) -> None:
        """One ``log_batch``; a batch the store refuses for good is dropped with a warning (so that it cannot
        block what follows), any other failure propagates as an outage."""
        try:
            self._client.log_batch(self._run_id, **batch)
        except Exception as error:
            if not is_permanent(error):
                raise
            log.warning("MLflow refused %s for run %s, dropped: %s", what, self._run_id, one_line(error))

    def _note_outage(self, error: BaseException) -> None:
        if not self._outage:
            self._outage = True
            log.warning(
                "MLflow at %s is unreachable (%s); buffering metrics until it answers",
                redact(self.uri),
                one_line(error),
            )

    def _log_file(self, what: str, call: Callable[[Any], Any]) -> None:
        """Runs an artifact upload; during an outage, or when it fails, the artifact is dropped with a
        warning (files are not buffered)."""
        if not self.active:
            return
        with self._lock:
            if self._outage and not answers(self.uri):
                log.warning("artifact %s not logged: MLflow at %s does not answer", what, redact(self.uri))
                return
            try:
                with env(ARTIFACT_HTTP):
                    call(self._client)
            except Exception as error:
                log.warning("artifact %s not logged to run %s: %s", what, self._run_id, one_line(error))

    def describe(self, text: str) -> None:
        """The run's description in the MLflow UI (the ``mlflow.note.content`` tag)."""
        self.set_tags({NOTE_TAG: text})

    def registered_checkpoint(self, model_uri: str, folder: str) -> str:
        """The checkpoint logged with a registered model version (:func:`registered_checkpoint`)."""
        return registered_checkpoint(model_uri, self.uri, folder)

    def browse_hint(self, run_id: str | None = None, experiment_runs: bool = False) -> str:
        """``mlflow ui ...`` and the run's page, or the server's page of it (:func:`browse_hint`)."""
        return browse_hint(self.uri, run_id or self._run_id, experiment_runs)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Sets run tags now."""
        from mlflow.entities import RunTag  # lazy: MLflow (2 s to import) loads only where a run is tracked

        safe = [RunTag(key, safe_value(key, value)) for key, value in tags.items()]
        self._log_file("tags", lambda client: client.log_batch(self._run_id, tags=safe))

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any], context: str) -> None:
        """Records the dataset version the run used as an MLflow input (the run's Datasets column)."""
        # lazy: MLflow (2 s to import) loads only where a run is tracked
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type="ccnet-shards",
            source=json.dumps({"uri": redact(source)}),
            profile=json.dumps(profile),
        )
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
        self._log_file("dataset", lambda client: client.log_inputs(self._run_id, datasets=inputs))

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """Stores ``data`` as JSON or YAML (by the extension of ``artifact_file``) in the run's artifacts."""
        self._log_file(artifact_file, lambda c: c.log_dict(self._run_id, data, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Stores ``text`` as the artifact ``artifact_file`` (a path inside the run's artifacts)."""
        self._log_file(artifact_file, lambda c: c.log_text(self._run_id, text, artifact_file))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Uploads a local file or folder into ``artifact_path`` (a folder inside the run's artifacts)."""
        self._log_file(local_path, lambda c: c.log_artifact(self._run_id, local_path, artifact_path))

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """Stores a matplotlib figure as an image (format from the extension, e.g. ``plots/x.png``)."""
        self._log_file(artifact_file, lambda c: c.log_figure(self._run_id, figure, artifact_file))

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
        """Logs ``model`` (images ``(B, 3, H, W)`` to logits ``(B, K, H, W)``: a CCNet as
        :class:`ccnet.inference.LogitsOnly`) as a pt2 program and, given its ``onnx_file``, as ONNX and as
        the image segmenter that is registered (:mod:`pipeline.tracking.mlflow_models`), with ``checkpoint``
        (a local file) and ``metrics``; returns the registered version of ``registered_name`` (None without
        one, or when it could not be logged). Aliases: ``candidate``, and ``champion`` when its ``val_mIoU``
        beats the champion's on the same dataset version and protocol (``version_tags``)."""
        run_id = self._run_id
        if run_id is None or not self.active:
            return None
        import mlflow  # lazy: MLflow (2 s to import) loads only where a run is tracked

        version: list[str | None] = []

        def call(client: Any) -> None:
            # log_model goes through MLflow's global state: point it at this store and experiment for the
            # call (MLFLOW_TRACKING_URI is only read while set_tracking_uri was never called, i.e. here). Its
            # check of the input example downloads the model back: without a progress bar on the console.
            scope = {
                "MLFLOW_TRACKING_URI": self.uri,
                "MLFLOW_EXPERIMENT_ID": self._experiment_id,
                "MLFLOW_EXPERIMENT_NAME": None,
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            }
            with env(scope):
                if mlflow.get_tracking_uri() != self.uri:  # someone called mlflow.set_tracking_uri
                    raise RuntimeError("MLflow's global tracking URI was set elsewhere")
                version.append(
                    log_models(
                        client,
                        run_id,
                        model,
                        name,
                        onnx_file=onnx_file,
                        checkpoint=checkpoint,
                        metrics=metrics or {},
                        registered_name=registered_name,
                        version_tags=version_tags or {},
                    )
                )

        self._log_file(f"model {name}", call)
        return version[0] if version else None

    def end(self, status: str = "FINISHED") -> None:
        """Sends what is buffered and closes the run with ``status`` (FINISHED, FAILED or KILLED); later
        calls are no-ops. Never raises for a store problem: what cannot be sent is reported as lost."""
        if not self.active:
            return
        self.settle()
        with self._lock:
            if not self._flush():
                log.warning(
                    "MLflow unreachable at the end of run %s: %d metric points and %d params lost",
                    self._run_id,
                    len(self._buffer.points),
                    len(self._buffer.pending_params),
                )
            # MLflow prints the run's URL on termination, credentials and all, when the URI holds them.
            quiet = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"} if holds_secret(self.uri) else {}
            try:
                with env(LOG_HTTP | quiet):
                    if status == "FAILED" and self._marked_killed():
                        status = "KILLED"  # the search that stopped this trial marked it first
                    self._client.set_terminated(self._run_id, status)
            except Exception as error:
                log.warning("MLflow run %s not marked %s: %s", self._run_id, status, one_line(error))
            self._ended = True
            self._unregister()

    def _marked_killed(self) -> bool:
        """Whether another process (a stopped search, for its trials) has already marked the run KILLED:
        the error this process then sees is the stop itself, and FAILED must not overwrite it."""
        try:
            return bool(self._client.get_run(self._run_id).info.status == "KILLED")
        except Exception:  # the status is then set as asked; set_terminated reports a store problem
            return False

    def end_children(self, status: str, failed_since: float | None = None) -> int:
        """Closes with ``status`` every run nested under this one still RUNNING (or FAILED after the time
        ``failed_since``: a trial the stop itself failed). Returns how many; never raises."""
        if not self.active:
            return 0
        try:
            with env(LOG_HTTP):
                return end_nested_runs(self._client, self._experiment_id, self._run_id, status, failed_since)
        except Exception as error:
            log.warning(
                "MLflow runs nested under %s not marked %s: %s", self._run_id, status, one_line(error)
            )
            return 0

    def _mark_killed(self) -> None:
        """The run (and its nested runs still RUNNING) marked KILLED as the process is ended by force (no
        lock, no flush: the main thread may be stuck holding them)."""
        if self.active:
            self.end_children("KILLED")
            with contextlib.suppress(Exception), env(LOG_HTTP):
                self._client.set_terminated(self._run_id, "KILLED")
