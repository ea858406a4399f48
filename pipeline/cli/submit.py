"""Jobs on a Ray cluster through the Jobs API: submit one of ``jobs/``, follow it, list, read and stop jobs.

    ccnet submit train -c configs/ccnet_r50-d8_camvid-360x360_20k.yaml --address http://HEAD:8265
    ccnet submit tune -c CONFIG --set tune.num_samples=8 --no-follow
    ccnet jobs list [--address URL]
    ccnet jobs logs JOB_ID [--follow]
    ccnet jobs stop JOB_ID

A submission uploads the working directory (the repository, without what ``.gitignore`` and
:data:`EXCLUDES` leave out) and runs ``python -m jobs.NAME ...`` in it. The runtime environment carries the
working directory, the values of a few named, non-secret environment variables (:data:`FORWARDED_ENV` plus
``--env NAME``), and with ``--pip`` the project's pinned requirements. Secrets never travel with a job: a name
that looks like one, or a value holding credentials (``https://user:pass@host``), is refused. The cluster's
nodes hold the credentials (Kubernetes secrets, instance profiles; the local stack starts its Ray head with
them). This is the only module that talks to the Jobs API.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline.config import load_config
from pipeline.io.paths import is_relative_path
from pipeline.io.redaction import holds_secret, is_secret_name, redact

log = logging.getLogger(__name__)

# Settings a job needs from the submitter's environment, forwarded when set. None of them is a secret.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_DISABLE_TELEMETRY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "RAY_USAGE_STATS_ENABLED",
)
EXCLUDES = [
    ".git",
    ".venv",
    "runs",
    "mlruns",
    "*.db",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """A job that cannot be submitted or managed; the message names the value at fault."""


def job_names() -> list[str]:
    """The jobs a user can submit: the modules of the ``jobs`` package, found without importing it (the
    library never imports its entry points)."""
    spec = importlib.util.find_spec("jobs")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(module.name for module in pkgutil.iter_modules(list(spec.submodule_search_locations)))


def pinned_requirements() -> list[str]:
    """The project's pinned runtime requirements, as installed (``pyproject.toml``'s dependencies)."""
    requirements = importlib.metadata.requires("ccnet") or []
    return [req for req in requirements if "extra ==" not in req]


def _check_secret_free(what: str, value: str) -> None:
    if holds_secret(value):
        raise SubmitError(
            f"{what} holds credentials ({redact(value)}): give them to the cluster's nodes, not to the job"
        )


def job_env(names: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``env_vars`` of a job: :data:`FORWARDED_ENV` and ``names``, with the submitter's values.

    Raises:
        SubmitError: a name that looks like a secret, a named variable that is not set, or a value that
            holds credentials.
    """
    environ = dict(os.environ if environ is None else environ)
    for name in names:
        if is_secret_name(name):
            raise SubmitError(
                f"--env {name}: secrets do not travel with a job; give them to the cluster's "
                "nodes (a Kubernetes secret, an instance profile, the stack's environment)"
            )
        if name not in environ:
            raise SubmitError(f"--env {name}: not set in this environment")
    values = {name: environ[name] for name in (*FORWARDED_ENV, *names) if name in environ}
    for name, value in values.items():
        _check_secret_free(f"environment variable {name}", value)
    return values


def runtime_env(working_dir: Path, env_vars: dict[str, str], pip: bool) -> dict[str, Any]:
    """The job's runtime environment: working dir and excludes, env vars, optionally the pinned packages."""
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env_vars}
    if pip:
        env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
    return env


def _check_remote_paths(config: Any) -> None:
    """Local relative paths would land in the job's temporary working directory on the cluster."""
    for key, value in (("data.uri", config.data.uri), ("run.storage", config.run.storage)):
        if is_relative_path(value):
            raise SubmitError(
                f"{key}={value} is a relative path: on the cluster it would land in the "
                "job's temporary working directory; use s3://... or an absolute shared path"
            )


@dataclass
class Submission:
    """What :func:`submit` sends: the entry point, runtime env and metadata (kept for inspection)."""

    job: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str


def build_submission(
    job: str,
    args: list[str],
    *,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    working_dir: Path | None = None,
    env_names: list[str] | None = None,
    pip: bool = False,
    submission_id: str | None = None,
) -> Submission:
    """Check a job and its config here, before anything reaches the cluster, and describe its submission.

    Args:
        job: a module of ``jobs/`` (``train``, ``tune``, ``evaluate``, ``prepare_data``, ``quickstart``).
        args: further command-line arguments of the job, passed as they are.
        config_path: ``-c``: a YAML config inside ``working_dir`` (it travels with it).
        overrides: ``--set key=value`` items, checked against the config's types here.

    Raises:
        SubmitError / ConfigError: an unknown job, a config outside the working dir, a bad key or value, a
            relative storage path, or a secret in a value.
    """
    working_dir = (working_dir or Path.cwd()).resolve()
    if job not in job_names():
        raise SubmitError(f"unknown job {job!r}: expected one of {', '.join(job_names())}")
    overrides = list(overrides or [])
    command = ["python", "-m", f"jobs.{job}"]
    if config_path is not None or overrides:
        config = load_config(config_path, overrides)  # a bad key fails here, not an hour later on the cluster
        if job in ("train", "tune"):
            _check_remote_paths(config)
    if config_path is not None:
        path = Path(config_path).resolve()
        if not path.is_relative_to(working_dir):
            raise SubmitError(
                f"config {config_path} is outside the working dir {working_dir}, so it would "
                "not reach the cluster: put it under it or pass --working-dir"
            )
        command += ["-c", path.relative_to(working_dir).as_posix()]
    for item in overrides:
        _check_secret_free(f"--set {item.split('=', 1)[0]}", item)
        command += ["--set", item]
    for item in args:
        _check_secret_free("argument", item)
    command += args
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return Submission(
        job=job,
        entrypoint=shlex.join(command),
        runtime_env=runtime_env(working_dir, job_env(list(env_names or [])), pip),
        metadata={"ccnet.job": job, "ccnet.config": config_path or "", "ccnet.submitted_by": "ccnet submit"},
        submission_id=submission_id or f"ccnet-{job}-{stamp}-{secrets.token_hex(3)}",
    )


def resolve_address(address: str | None) -> str:
    """``--address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (the local stack's env.sh sets it)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return address


@contextlib.contextmanager
def _address_wins(address: str) -> Iterator[None]:
    """Ray lets RAY_ADDRESS override the client's address argument; an explicit --address must win."""
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def client(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for the cluster; one clear error when its job server cannot be reached."""
    # lazy: Ray's job client loads only when a cluster is contacted
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        with _address_wins(url):
            return JobSubmissionClient(url)
    except Exception as error:  # ConnectionError, an auth error, a version mismatch: all one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SubmitError(f"cannot reach the Ray job server at {redact(url)}: {redact(first)}") from None


def submit(jobs_client: Any, submission: Submission, *, entrypoint_num_cpus: float | None = None) -> str:
    """Submit; returns the job's submission id."""
    return jobs_client.submit_job(
        entrypoint=submission.entrypoint,
        runtime_env=submission.runtime_env,
        metadata=submission.metadata,
        submission_id=submission.submission_id,
        entrypoint_num_cpus=entrypoint_num_cpus,
    )


def follow(jobs_client: Any, job_id: str, out: TextIO | None = None) -> str:
    """Stream the job's logs to ``out`` (stdout) until it ends; returns its final status (SUCCEEDED, ...)."""
    out = out or sys.stdout

    async def stream() -> None:
        async for lines in jobs_client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    with contextlib.suppress(RuntimeError):  # the log socket can close at the end before the status lands
        asyncio.run(stream())
    return wait(jobs_client, job_id)


def wait(jobs_client: Any, job_id: str, timeout: float | None = None, poll: float = 1.0) -> str:
    """Poll until the job is in a terminal state; returns it. Raises TimeoutError after ``timeout`` s."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while (status := str(jobs_client.get_job_status(job_id).value)) not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)
    return status


def is_running(jobs_client: Any, job_id: str) -> bool:
    return str(jobs_client.get_job_status(job_id).value) not in TERMINAL


def jobs_table(jobs_client: Any) -> str:
    """The cluster's jobs, newest first: id, status, start time, entry point."""
    rows = ["| submission id | status | started (UTC) | entrypoint |", "|---|---|---|---|"]
    details = sorted(jobs_client.list_jobs(), key=lambda job: job.start_time or 0, reverse=True)
    for job in details:
        started = (
            dt.datetime.fromtimestamp(job.start_time / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            if job.start_time
            else "-"
        )
        entrypoint = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
        rows.append(f"| {job.submission_id or job.job_id} | {job.status.value} | {started} | {entrypoint} |")
    return "\n".join(rows)


def job_error(jobs_client: Any, job_id: str, status: str) -> str:
    """One line saying how a job ended badly (Ray's message, first line)."""
    message = (jobs_client.get_job_info(job_id).message or "").strip().splitlines()
    return f"job {job_id} {status}" + (f": {redact(message[0])}" if message else "")
