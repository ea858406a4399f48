"""MLflow client helpers: the library imported with its notices tamed, per-call HTTP settings, experiments,
the tags MLflow's fluent API would set, runs looked up by name, registered models and their aliases."""

from __future__ import annotations

import getpass
import logging
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.redaction import REDACTED, is_secret_name, redact
from pipeline.tracking.base import TrackingError
from pipeline.tracking.uri import answers, env, one_line

log = logging.getLogger(__name__)


# MLflow reads these on every request. Its defaults (7 retries, exponential backoff, 120 s timeout) would
# stall a training step for minutes while the server is down, so each kind of call gets its own bounds.
PROBE_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
LOG_HTTP = {  # one retry (urllib3 waits 0 s before it) covers a pooled connection the server closed
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
ARTIFACT_HTTP = {  # uploads keep the default timeout: the server answers only once it has stored the file
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def import_mlflow() -> Any:
    # Telemetry is read from the environment at import and at every call: set it before the first import.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import mlflow  # lazy: MLflow (2 s to import) loads only where a run is tracked

    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # --debug shows MLflow's and alembic's notices
        for name in ("mlflow", "alembic"):  # "Creating initial MLflow database tables...", migrations
            logging.getLogger(name).setLevel(logging.WARNING)
        pytorch = logging.getLogger("mlflow.pytorch")
        if not any(isinstance(f, _PickleNotice) for f in pytorch.filters):
            pytorch.addFilter(_PickleNotice())
    return mlflow


class _PickleNotice(logging.Filter):
    """Drops MLflow's advice to log PyTorch models as ``pt2`` instead of pickle: the project logs ``pt2``
    (:mod:`pipeline.tracking.mlflow_models`); the advice would only repeat on a user's own pickled model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "serialization_format" not in record.getMessage()


def _sqlite_artifact_location(uri: str) -> str | None:
    """``file:`` URI of an ``artifacts`` folder beside a sqlite store; None for other stores (a server
    decides itself). Without it MLflow would put artifacts under ``./mlruns`` of whatever the cwd is."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(urllib.parse.unquote(uri[len("sqlite:///") :]))
    return (database.resolve().parent / "artifacts").as_uri()


def is_permanent(error: BaseException) -> bool:
    """True when the store understood the request and refused it (4xx other than 408 and 429): sending it
    again cannot help. Connection failures and timeouts surface as 500-class errors."""
    # lazy: MLflow (2 s to import) loads only where a run is tracked
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


def source_name(argv: list[str]) -> str:
    """What started the run, as the runs table shows it: ``jobs.train`` for a job (``python -m jobs.train``,
    as ``ccnet submit`` runs it), else ``ccnet <command>``."""
    program = Path(argv[0]) if argv and argv[0] else Path("ccnet")
    if program.parent.name == "jobs":
        return f"jobs.{program.stem}"
    return " ".join(["ccnet", *(arg for arg in argv[1:2] if not arg.startswith("-"))])


def context_tags() -> dict[str, str]:
    """The tags MLflow's fluent API sets and ``client.create_run`` does not: the command, the user and the
    git commit of the code (when it runs from a checkout)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": source_name(sys.argv)}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if re.fullmatch(r"[0-9a-f]{40}", commit):
        tags["mlflow.source.git.commit"] = commit
    return tags


# MLflow 3's UI opens an experiment by its kind; without this tag it shows the GenAI (traces) page.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing (tolerating a concurrent creator), of the kind
    "custom model development" (an experiment without a kind is given it; a user's own kind is kept)."""
    # lazy: MLflow (2 s to import) loads only where a run is tracked
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=_sqlite_artifact_location(uri),
                tags={"mlflow.note.content": EXPERIMENT_NOTE, EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]},
            )
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another trial created it meanwhile
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} at {redact(uri)} is deleted: restore or rename it")
    if EXPERIMENT_KIND[0] not in experiment.tags:  # created before the kind existed, or by someone else
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def last_steps(client: Any, run: Any) -> dict[str, int]:
    """The last step the run holds of each of its metrics (one request per metric)."""
    return {
        key: max((m.step for m in client.get_metric_history(run.info.run_id, key)), default=-1)
        for key in run.data.metrics
    }


CHAMPION_METRIC = "val_mIoU"  # what makes a registered version the champion (higher is better)


def image_signature(model: Any) -> tuple[Any, Any]:
    """The MLflow signature of a model mapping ``(B, 3, H, W)`` images to ``(B, K, H, W)`` float32 logits, any
    batch and image size, and an input example (two 64x96 images of zeros)."""
    # lazy: torch and MLflow (2 s to import) load only where a model is logged
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # Two images, not square: torch.export (pt2) keeps a size-1 batch, and equal sides, as constants.
    example = np.zeros((2, 3, 64, 96), dtype=np.float32)
    with torch.inference_mode():
        classes = int(model(torch.from_numpy(example)).shape[1])
    floats = np.dtype(np.float32)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(floats, (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(floats, (-1, classes, -1, -1))]),
    )
    return signature, example


def register(client: Any, name: str, model_id: str, run_id: str, await_for: int = 60) -> str:
    """A new version of registered model ``name`` (created if missing) from logged model ``model_id``;
    returns the version. What ``log_model(registered_model_name=...)`` does, without the lines MLflow prints
    to stderr about it (the caller logs one of its own)."""
    # lazy: MLflow (2 s to import) loads only where a run is tracked
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(
        name, f"models:/{model_id}", run_id=run_id, model_id=model_id, await_creation_for=await_for
    )
    return str(version.version)


# A version's dataset version and evaluation protocol, as a tag: scores compare only within one value.
COMPARABLE = "ccnet.comparable"


def promote(client: Any, name: str, version: str, score: float | None, tags: dict[str, str]) -> None:
    """Tags the new version (``tags``: its variant, dataset version, protocol and :data:`COMPARABLE`), gives
    it ``candidate``, and ``champion`` when there is none, or when its score beats the champion's on the same
    dataset version and protocol (a score on other data or another protocol is not compared)."""
    # lazy: MLflow (2 s to import) loads only where a run is tracked
    from mlflow.exceptions import MlflowException

    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, "candidate", version)
    if score is None:
        return
    client.set_model_version_tag(name, version, CHAMPION_METRIC, repr(score))  # exact: compared below
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:  # no champion yet
        champion = None
    if champion is not None and champion.tags.get(COMPARABLE) != tags.get(COMPARABLE):
        log.info(
            "registered model %s version %s not compared with champion version %s: another dataset "
            "version or protocol",
            name,
            version,
            champion.version,
        )
        return
    best = float(champion.tags.get(CHAMPION_METRIC, "-inf")) if champion is not None else float("-inf")
    if score > best:
        client.set_registered_model_alias(name, "champion", version)
        log.info(
            "registered model %s version %s is the champion (%s %.4f)", name, version, CHAMPION_METRIC, score
        )


def registered_checkpoint(model_uri: str, tracking_uri: str, folder: str) -> str:
    """Downloads the checkpoint stored with a registered model (``models:/NAME@alias`` or
    ``models:/NAME/VERSION``) into ``folder``; returns its local path. The model itself is not loaded.

    Raises:
        FileNotFoundError: no such model, alias or version, or one logged without its checkpoint.
    """
    import_mlflow()
    # lazy: MLflow (2 s to import) loads only where a run is tracked
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    # The segmenter keeps it as an artifact, a pt2 model (and every version logged before) as an extra file.
    for path in ("artifacts/checkpoint.pt", "extra_files/checkpoint.pt"):
        try:
            with env({"MLFLOW_TRACKING_URI": tracking_uri}):
                return download_artifacts(
                    artifact_uri=f"{model_uri.rstrip('/')}/{path}", dst_path=folder, tracking_uri=tracking_uri
                )
        except (MlflowException, OSError) as error:
            missing = error
    raise FileNotFoundError(
        f"{model_uri}: no registered model checkpoint at {redact(tracking_uri)} ({one_line(missing)[:200]})"
    ) from None


def browse_hint(tracking_uri: str, run_id: str | None, experiment_runs: bool = False) -> str:
    """How to open a run in the UI: its page on the tracking server
    (``<server>/#/experiments/<id>/runs/<run>``), or ``mlflow ui`` on a local store and that page on it;
    with ``experiment_runs``, the experiment's runs table. A direct link, because MLflow 3.17 opens an
    experiment's own page on the GenAI overview whatever its kind while a browser-wide GenAI / Model-training
    switch says GenAI (its default; mlflow#24498)."""
    server = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else None
    page = ""
    if run_id:
        try:
            with env({"MLFLOW_TRACKING_URI": tracking_uri} | PROBE_HTTP):
                experiment = import_mlflow().MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
            page = f"/#/experiments/{experiment}/runs" + ("" if experiment_runs else f"/{run_id}")
        except Exception:  # the store went away: the address of the UI alone
            page = ""
    if server:
        return redact(server + page)
    return f"mlflow ui --backend-store-uri {tracking_uri}, then http://127.0.0.1:5000{page or '/'}"


def find_run(uri: str, experiment: str, run_name: str, parent_run_id: str | None = None) -> str | None:
    """The id of the latest (by start time) active run named ``run_name`` in ``experiment`` (and nested under
    ``parent_run_id`` when given), for resuming by name.

    Returns:
        None when there is no such run or experiment, and also when the store cannot be reached (logged as a
        warning): :meth:`Tracker.start` then decides, by ``required``, whether that is fatal.
    """
    mlflow = import_mlflow()
    quoted = run_name.replace("\\", "\\\\").replace("'", "\\'")
    try:
        if not answers(uri):
            raise ConnectionError("no answer from /health")
        with env(PROBE_HTTP):
            client = mlflow.MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                return None
            query = f"attributes.run_name = '{quoted}'"
            if parent_run_id is not None:
                query += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
            runs = client.search_runs(
                [found.experiment_id],
                filter_string=query,
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
    except Exception as error:
        log.warning("cannot look up run %r at %s: %s", run_name, redact(uri), one_line(error))
        return None
    return runs[0].info.run_id if runs else None


def resumable_run(client: Any, run_id: str, uri: str) -> Any:
    """The run to continue, or None (with a warning) when it is gone: a new run is better than none."""
    # lazy: MLflow (2 s to import) loads only where a run is tracked
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.warning("MLflow run %s not found at %s; starting a new run", run_id, redact(uri))
        return None
    if run.info.lifecycle_stage != "active":
        log.warning("MLflow run %s is deleted; starting a new run", run_id)
        return None
    return run


def end_nested_runs(
    client: Any,
    experiment_id: str | None,
    parent_run_id: str | None,
    status: str,
    failed_since: float | None = None,
) -> int:
    """Marks ``status`` every run of the experiment nested under ``parent_run_id`` that is still RUNNING,
    and with ``failed_since`` (seconds since the epoch) every one that ended FAILED at or after that time
    (a trial whose process saw the search's stop as an error); returns how many."""

    def nested(state: str) -> list[Any]:
        query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = '{state}'"
        return list(client.search_runs([experiment_id], filter_string=query))

    children = nested("RUNNING")
    if failed_since is not None:
        children += [run for run in nested("FAILED") if (run.info.end_time or 0) >= int(failed_since * 1000)]
    for child in children:
        client.set_terminated(child.info.run_id, status)
    return len(children)


_MAX_PARAM_CHARS = 6000  # MLflow's limit (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)


def safe_value(key: str, value: object) -> str:
    """A param or tag value as MLflow will store it: a string, redacted, at most MLflow's length."""
    if is_secret_name(key):
        return REDACTED
    text = redact(str(value))
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."
