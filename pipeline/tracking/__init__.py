"""Experiment tracking on MLflow: the only module of the project that imports ``mlflow``.

One MLflow run per training run, written by rank 0 through an ``MlflowClient`` bound to an explicit tracking
URI and the run's id (no fluent ``mlflow.start_run`` state), so that the run id can travel through the train
loop's config and a resumed job continues the same run::

    tracker = Tracker(resolve_tracking_uri(config.tracking.uri), config.tracking.experiment,
                      required=config.tracking.required)
    run_id = tracker.start(config.run.name, run_id=previous_run_id)  # None: a new run
    tracker.log_params(config.flat())
    tracker.log_metrics({"train/loss": loss}, step=iteration)
    tracker.end()

A server that cannot be reached at ``start`` is fatal (:class:`TrackingError`) when tracking is required, else
the tracker turns into a no-op. Once started, tracking never fails the training: during an outage metrics
(and params) are buffered in memory and sent, in order and with their original steps and times, by the next
call that gets through or by :meth:`Tracker.end`; artifacts logged during an outage are dropped with a
warning. Credentials never reach MLflow params or log messages (:func:`redact`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

from pipeline.interrupts import on_forced_exit
from pipeline.io.redaction import REDACTED, holds_secret, is_secret_name, redact

log = logging.getLogger(__name__)

_MAX_PARAM_CHARS = 6000  # MLflow's limit (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
_METRICS_PER_BATCH = 1000
_MAX_BUFFERED = 100_000  # metric points held during an outage (~10 MB); the oldest go first beyond that

# MLflow reads these on every request. Its defaults (7 retries, exponential backoff, 120 s timeout) would
# stall a training step for minutes while the server is down, so each kind of call gets its own bounds.
_PROBE_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
_LOG_HTTP = {  # one retry (urllib3 waits 0 s before it) covers a pooled connection the server closed
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
_ARTIFACT_HTTP = {  # uploads keep the default timeout: the server answers only once it has stored the file
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
_HEALTH_TIMEOUT_S = 1.0


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message is one line naming the (redacted) tracking URI."""


class _Point(NamedTuple):
    key: str
    value: float
    timestamp_ms: int
    step: int


def _safe_value(key: str, value: object) -> str:
    """A param or tag value as MLflow will store it: a string, redacted, at most MLflow's length."""
    if is_secret_name(key):
        return REDACTED
    text = redact(str(value))
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return redact(lines[0])[:300]


def resolve_tracking_uri(configured: str | None, default_dir: str = "runs") -> str:
    """The tracking URI to use: ``configured`` if set, else ``MLFLOW_TRACKING_URI``, else a sqlite file.

    Args:
        configured: ``tracking.uri`` from the run config (None or "" when unset).
        default_dir: folder of the fallback ``mlflow.db``; created when that fallback is chosen.

    Returns:
        A URI such as ``http://127.0.0.1:5000`` or ``sqlite:////abs/runs/mlflow.db`` (MLflow 3 refuses the
        old ``file:`` store, so the embedded default is sqlite).
    """
    if configured:
        return configured
    if from_env := os.environ.get("MLFLOW_TRACKING_URI"):
        return from_env
    folder = Path(default_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder}/mlflow.db"


def _import_mlflow() -> Any:
    # Telemetry is read from the environment at import and at every call: set it before the first import.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import mlflow

    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # --debug shows MLflow's and alembic's notices
        for name in ("mlflow", "alembic"):  # "Creating initial MLflow database tables...", migrations
            logging.getLogger(name).setLevel(logging.WARNING)
        pytorch = logging.getLogger("mlflow.pytorch")
        if not any(isinstance(f, _PickleNotice) for f in pytorch.filters):
            pytorch.addFilter(_PickleNotice())
    return mlflow


class _PickleNotice(logging.Filter):
    """Drops MLflow's advice to log PyTorch models as ``pt2`` instead of pickle, printed at every model
    logged: the project pickles on purpose (README, model registry) and never unpickles what it reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "serialization_format" not in record.getMessage()


@contextlib.contextmanager
def _env(values: dict[str, str | None]) -> Iterator[None]:
    """Sets (None: removes) environment variables for the block and restores them after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _is_http(uri: str) -> bool:
    return urllib.parse.urlsplit(uri).scheme in ("http", "https")


def _answers(uri: str) -> bool:
    """True when an HTTP tracking server answers ``/health`` at all (any status) within about a second;
    True for every other kind of store, which has no cheap probe."""
    if not _is_http(uri):
        return True
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]  # credentials are not needed for /health and must not be sent
    url = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=_HEALTH_TIMEOUT_S):
            return True
    except urllib.error.HTTPError:  # it answered, with an error status: reachable
        return True
    except urllib.error.URLError as error:  # a TLS complaint is an answer: MLflow has its own TLS settings
        return isinstance(error.reason, ssl.SSLError)
    except (OSError, ValueError):  # refused, timed out, unresolvable, malformed
        return False


def _sqlite_artifact_location(uri: str) -> str | None:
    """``file:`` URI of an ``artifacts`` folder beside a sqlite store; None for other stores (a server
    decides itself). Without it MLflow would put artifacts under ``./mlruns`` of whatever the cwd is."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(urllib.parse.unquote(uri[len("sqlite:///"):]))
    return (database.resolve().parent / "artifacts").as_uri()


def _is_permanent(error: BaseException) -> bool:
    """True when the store understood the request and refused it (4xx other than 408 and 429): sending it
    again cannot help. Connection failures and timeouts surface as 500-class errors."""
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


EXPERIMENT_NOTE = (
    "CCNet (criss-cross attention) trainings and searches from the `ccnet` command. Each training run holds "
    "its resolved config (config.yaml), the model variant (tag ccnet.variant), the dataset version as an "
    "input, val mIoU curves, the final single-scale and multi-scale + flip results (evaluation/results.md) "
    "and its best checkpoint; searches and ablations are parent runs with one nested run per trial."
)


def context_tags() -> dict[str, str]:
    """The tags MLflow's fluent API sets and ``client.create_run`` does not: the command, the user and the
    git commit of the code (when it runs from a checkout)."""
    import getpass
    import subprocess

    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": " ".join(
        ["ccnet", *(arg for arg in sys.argv[1:2] if not arg.startswith("-"))]) if sys.argv else "ccnet"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if re.fullmatch(r"[0-9a-f]{40}", commit):
        tags["mlflow.source.git.commit"] = commit
    return tags


def registered_checkpoint(model_uri: str, tracking_uri: str, folder: str) -> str:
    """Downloads the checkpoint stored with a registered model (``models:/NAME@alias`` or
    ``models:/NAME/VERSION``) into ``folder``; returns its local path. The model itself is not loaded.

    Raises:
        FileNotFoundError: no such model, alias or version, or one logged without its checkpoint.
    """
    _import_mlflow()
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        with _env({"MLFLOW_TRACKING_URI": tracking_uri}):
            local = download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/extra_files/checkpoint.pt",
                                       dst_path=folder, tracking_uri=tracking_uri)
    except (MlflowException, OSError) as error:
        raise FileNotFoundError(f"{model_uri}: no registered model checkpoint at {redact(tracking_uri)} "
                                f"({_one_line(error)[:200]})") from None
    return local


CHAMPION_METRIC = "val_mIoU"  # what makes a registered version the champion (higher is better)


def _promote(client: Any, name: str, version: str, score: float | None) -> None:
    """``candidate`` -> the new version; ``champion`` -> it too when its score beats the champion's."""
    from mlflow.exceptions import MlflowException

    client.set_registered_model_alias(name, "candidate", version)
    if score is None:
        return
    client.set_model_version_tag(name, version, CHAMPION_METRIC, f"{score:.6f}")
    try:
        champion = client.get_model_version_by_alias(name, "champion")
        best = float(champion.tags.get(CHAMPION_METRIC, "-inf"))
    except MlflowException:  # no champion yet
        best = float("-inf")
    if score > best:
        client.set_registered_model_alias(name, "champion", version)
        log.info("registered model %s version %s is the champion (%s %.4f)", name, version, CHAMPION_METRIC,
                 score)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing (tolerating a concurrent creator)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_sqlite_artifact_location(uri),
                                            tags={"mlflow.note.content": EXPERIMENT_NOTE})
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another trial created it meanwhile
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} at {redact(uri)} is deleted: restore or rename it")
    return experiment.experiment_id


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The id of the latest (by start time) active run named ``run_name`` in ``experiment``, for resuming
    by name.

    Returns:
        None when there is no such run or experiment, and also when the store cannot be reached (logged as a
        warning): :meth:`Tracker.start` then decides, by ``required``, whether that is fatal.
    """
    mlflow = _import_mlflow()
    quoted = run_name.replace("\\", "\\\\").replace("'", "\\'")
    try:
        if not _answers(uri):
            raise ConnectionError("no answer from /health")
        with _env(_PROBE_HTTP):
            client = mlflow.MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                return None
            runs = client.search_runs(
                [found.experiment_id], filter_string=f"attributes.run_name = '{quoted}'",
                order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as error:
        log.warning("cannot look up run %r at %s: %s", run_name, redact(uri), _one_line(error))
        return None
    return runs[0].info.run_id if runs else None


def _last_steps(client: Any, run: Any) -> dict[str, int]:
    """The last step the run holds of each of its metrics (one request per metric)."""
    return {key: max((m.step for m in client.get_metric_history(run.info.run_id, key)), default=-1)
            for key in run.data.metrics}


class Tracker:
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

    def __init__(self, uri: str, experiment: str, required: bool = True,
                 settle_timeout: float = 120.0) -> None:
        self.uri = uri
        self.experiment = experiment
        self.required = required
        self.settle_timeout = settle_timeout
        self._client: Any = None
        self._experiment_id: str | None = None
        self._run_id: str | None = None
        self._ended = False
        self._params: dict[str, str] = {}  # what the run holds
        self._pending_params: dict[str, str] = {}  # accepted here, not yet stored (outage)
        self._buffer: deque[_Point] = deque()
        self._dropped = 0
        self._outage = False
        self._lock = threading.Lock()  # a checkpoint thread may log beside the training loop
        self._logged_through: dict[str, int] = {}
        self._unregister: Callable[[], None] = lambda: None  # a continued run's last recorded step per metric

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once started (kept after :meth:`end`); None for a no-op tracker."""
        return self._run_id

    @property
    def active(self) -> bool:
        """True between a successful :meth:`start` and :meth:`end`."""
        return self._run_id is not None and not self._ended

    def start(
        self, run_name: str, run_id: str | None = None, tags: dict[str, str] | None = None
    ) -> str | None:
        """Opens the run: continues ``run_id`` when given and it exists (resume), else creates one.

        The store is checked first (an HTTP server's ``/health`` within a second, then the experiment with
        a 5 s timeout and no retries), so a dead server fails before any training work.

        Returns:
            The run id; None when the store is unusable and tracking is not required (the tracker is then
            a no-op).

        Raises:
            TrackingError: the store is unusable and ``required`` is True.
            RuntimeError: the tracker was started before.
        """
        if self._run_id is not None or self._ended:
            raise RuntimeError("Tracker.start called twice")
        mlflow = _import_mlflow()
        from mlflow.entities import RunTag

        safe_tags = {key: _safe_value(key, value) for key, value in (tags or {}).items()}
        try:
            if not _answers(self.uri):
                raise ConnectionError("no answer from /health")
            with _env(_PROBE_HTTP):
                client = mlflow.MlflowClient(tracking_uri=self.uri)
                experiment_id = _experiment_id(client, self.experiment, self.uri)
                run = self._resumable(client, run_id) if run_id else None
                if run is None:
                    run = client.create_run(experiment_id, run_name=run_name,
                                            tags={**context_tags(), **safe_tags})
                else:
                    client.update_run(run.info.run_id, status="RUNNING")
                    if safe_tags:
                        client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in safe_tags.items()])
                    self._params = dict(run.data.params)
                    self._logged_through = _last_steps(client, run)
        except Exception as error:
            message = f"MLflow tracking at {redact(self.uri)} is unusable: {_one_line(error)}"
            if self.required:
                raise TrackingError(message) from None  # the chained error may quote credentials
            log.warning("%s; going on without tracking", message)
            self._ended = True
            return None
        self._client, self._experiment_id, self._run_id = client, experiment_id, run.info.run_id
        self._unregister = on_forced_exit(self._mark_killed)  # a Ctrl-C whose shutdown hangs
        log.info("MLflow run %s (%s) in experiment %r at %s", self._run_id, run_name, self.experiment,
                 redact(self.uri))
        return self._run_id

    def _resumable(self, client: Any, run_id: str) -> Any:
        """The run to continue, or None (with a warning) when it is gone: a new run is better than none."""
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s not found at %s; starting a new run", run_id, redact(self.uri))
            return None
        if run.info.lifecycle_stage != "active":
            log.warning("MLflow run %s is deleted; starting a new run", run_id)
            return None
        return run

    def log_params(self, params: dict[str, object]) -> None:
        """Records params: values as strings (cut to 6000 characters), secrets redacted (see :func:`redact`;
        keys naming a secret get ``***``). A param the run already holds with the same value is skipped; with
        another value it is skipped with a warning, since MLflow never changes a param."""
        if not self.active:
            return
        with self._lock:
            for key, value in params.items():
                text = _safe_value(key, value)
                known = self._pending_params.get(key, self._params.get(key))
                if known is None:
                    self._pending_params[key] = text
                elif known != text:
                    log.warning("param %s keeps its first value %r (MLflow never changes a param; new: %r)",
                                key, known, text)
            self._flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Records metric values at ``step`` (timestamped now). Never raises for a store problem: during an
        outage the points wait in memory (the newest 100,000) for the next call that gets through. The call
        that meets the outage waits at most ~10 s (a silent host), later ones at most ~1 s (the probe)."""
        if not self.active:
            return
        now = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                if step <= self._logged_through.get(key, -1):
                    continue  # a resumed run repeats the steps after its checkpoint: the record has them
                self._buffer.append(_Point(key, float(value), now, int(step)))
            while len(self._buffer) > _MAX_BUFFERED:
                self._buffer.popleft()
                self._dropped += 1
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
        from mlflow.entities import Metric, Param

        if not (self._pending_params or self._buffer):
            return True
        if self._outage and not _answers(self.uri):
            return False  # a refused or black-holed server costs at most one second per call
        try:
            with _env(_LOG_HTTP):
                while self._pending_params:
                    batch = dict(list(self._pending_params.items())[:_PARAMS_PER_BATCH])
                    self._send("params", params=[Param(key, value) for key, value in batch.items()])
                    self._params.update(batch)
                    for key in batch:
                        del self._pending_params[key]
                while self._buffer:
                    batch = [self._buffer[i] for i in range(min(_METRICS_PER_BATCH, len(self._buffer)))]
                    self._send("metrics", metrics=[Metric(*point) for point in batch])
                    for _ in batch:
                        self._buffer.popleft()
        except Exception as error:
            self._note_outage(error)
            return False
        if self._outage:
            self._outage = False
            lost = f"; the {self._dropped} oldest metric points were dropped" if self._dropped else ""
            log.warning("MLflow at %s answers again; buffered metrics sent%s", redact(self.uri), lost)
            self._dropped = 0
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
                if self._flush() and (not self._outage or _answers(self.uri)):
                    if self._outage:  # back, with nothing left to send
                        self._outage = False
                        log.warning("MLflow at %s answers again", redact(self.uri))
                    return True
            if time.monotonic() >= deadline:
                return False
            if not waited:
                waited = True
                log.warning("waiting up to %.0f s for MLflow at %s to answer again",
                            deadline - time.monotonic(), redact(self.uri))
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def _send(self, what: str, **batch: list) -> None:
        """One ``log_batch``; a batch the store refuses for good is dropped with a warning (so that it cannot
        block what follows), any other failure propagates as an outage."""
        try:
            self._client.log_batch(self._run_id, **batch)
        except Exception as error:
            if not _is_permanent(error):
                raise
            log.warning("MLflow refused %s for run %s, dropped: %s", what, self._run_id, _one_line(error))

    def _note_outage(self, error: BaseException) -> None:
        if not self._outage:
            self._outage = True
            log.warning("MLflow at %s is unreachable (%s); buffering metrics until it answers",
                        redact(self.uri), _one_line(error))

    def _log_file(self, what: str, call: Callable[[Any], Any]) -> None:
        """Runs an artifact upload; during an outage, or when it fails, the artifact is dropped with a
        warning (files are not buffered)."""
        if not self.active:
            return
        with self._lock:
            if self._outage and not _answers(self.uri):
                log.warning("artifact %s not logged: MLflow at %s does not answer", what, redact(self.uri))
                return
            try:
                with _env(_ARTIFACT_HTTP):
                    call(self._client)
            except Exception as error:
                log.warning("artifact %s not logged to run %s: %s", what, self._run_id, _one_line(error))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Sets run tags now (``mlflow.note.content`` is the run's description in the UI)."""
        from mlflow.entities import RunTag

        safe = [RunTag(key, _safe_value(key, value)) for key, value in tags.items()]
        self._log_file("tags", lambda client: client.log_batch(self._run_id, tags=safe))

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any], context: str) -> None:
        """Records the dataset version the run used as an MLflow input (the run's Datasets column)."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="ccnet-shards", source=json.dumps(
            {"uri": redact(source)}), profile=json.dumps(profile))
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

    def log_model(self, model: torch.nn.Module, name: str = "model", registered_name: str | None = None,
                  metrics: dict[str, float] | None = None, checkpoint: str | None = None) -> str | None:
        """Logs ``model`` as an MLflow PyTorch model linked to this run and, with ``registered_name``,
        registers it; returns the registered version (None without one, or when it could not be logged).

        ``model`` maps an image batch ``(B, 3, H, W)`` to one tensor ``(B, K, H, W)`` (a CCNet goes in as
        :class:`ccnet.inference.LogitsOnly`). It gets a signature of any batch and image size, an input
        example, ``metrics`` linked to it, the ``ccnet`` package as
        code (so it loads where the project is not installed) and ``checkpoint`` (a local file) as an extra
        file: ``ccnet predict`` and ``ccnet evaluate`` read that one with ``weights_only=True`` from a
        ``models:/NAME@alias`` URI, never unpickling the model. It is pickled rather than ``pt2``: see the
        README's model registry section. The new version gets the alias ``candidate``, and ``champion``
        when its ``val_mIoU`` tag beats the champion's.
        """
        if not self.active:
            return None
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        import ccnet

        example = np.zeros((1, 3, 64, 64), dtype=np.float32)
        with torch.inference_mode():
            classes = int(model(torch.from_numpy(example)).shape[1])
        floats = np.dtype(np.float32)
        signature = ModelSignature(inputs=Schema([TensorSpec(floats, (-1, 3, -1, -1))]),
                                   outputs=Schema([TensorSpec(floats, (-1, classes, -1, -1))]))
        version: list[str] = []

        def call(client: Any) -> None:
            # log_model goes through MLflow's global state: point it at this store and experiment for the
            # call (MLFLOW_TRACKING_URI is only read while set_tracking_uri was never called, i.e. here).
            env = {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_EXPERIMENT_ID": self._experiment_id,
                   "MLFLOW_EXPERIMENT_NAME": None}
            with _env(env):
                if mlflow.get_tracking_uri() != self.uri:  # someone called mlflow.set_tracking_uri
                    raise RuntimeError("MLflow's global tracking URI was set elsewhere")
                info = mlflow.pytorch.log_model(
                    model, name=name, run_id=self._run_id, serialization_format="pickle",
                    pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                    code_paths=[str(Path(ccnet.__file__).parent)], signature=signature, input_example=example,
                    extra_files=[checkpoint] if checkpoint else None, registered_model_name=registered_name,
                    await_registration_for=60)
            for key, value in (metrics or {}).items():
                client.log_metric(self._run_id, key, value, model_id=info.model_id)
            if registered_name and info.registered_model_version is not None:
                version.append(str(info.registered_model_version))
                _promote(client, registered_name, version[0], (metrics or {}).get(CHAMPION_METRIC))

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
                log.warning("MLflow unreachable at the end of run %s: %d metric points and %d params lost",
                            self._run_id, len(self._buffer), len(self._pending_params))
            # MLflow prints the run's URL on termination, credentials and all, when the URI holds them.
            quiet = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"} if holds_secret(self.uri) else {}
            try:
                with _env(_LOG_HTTP | quiet):
                    self._client.set_terminated(self._run_id, status)
            except Exception as error:
                log.warning("MLflow run %s not marked %s: %s", self._run_id, status, _one_line(error))
            self._ended = True
            self._unregister()

    def _mark_killed(self) -> None:
        """The run marked KILLED as the process is ended by force (no lock, no flush: the main thread may
        be stuck holding them)."""
        if self.active:
            with contextlib.suppress(Exception), _env(_LOG_HTTP):
                self._client.set_terminated(self._run_id, "KILLED")


class NullTracker(Tracker):
    """A tracker that records nothing (ranks other than 0, tracking switched off); same methods."""

    def __init__(self) -> None:
        super().__init__(uri="", experiment="", required=False)
        self._ended = True

    def start(
        self, run_name: str, run_id: str | None = None, tags: dict[str, str] | None = None
    ) -> str | None:
        """Returns None."""
        return None
