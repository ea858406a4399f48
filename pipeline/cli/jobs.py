"""The ``ccnet`` commands that work with a Ray cluster's Jobs API: ``submit``, ``jobs`` and ``schedule``.

ccnet submit train -c configs/ccnet_r50-d8_camvid-360x360_20k.yaml --address http://127.0.0.1:8265
ccnet submit prepare_data --address http://127.0.0.1:8265 -- --dataset generated --out s3://ccnet/datasets
ccnet jobs list
ccnet jobs logs ccnet-train-20261201-101500-a1b2c3 --follow
ccnet jobs stop ccnet-train-20261201-101500-a1b2c3
ccnet schedule "0 2 * * 6" tune -c configs/ccnet_r50-d8_camvid-360x360_20k.yaml --address http://HEAD:8265
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

from pipeline import interrupts
from pipeline.cli.args import at_least
from pipeline.cli.schedule import parse_cron, run_schedule
from pipeline.cli.submit import (
    Submission,
    build_submission,
    client,
    follow,
    is_running,
    job_error,
    job_names,
    jobs_table,
    submit,
    wait,
)

log = logging.getLogger("ccnet")

# The run-name key a scheduled run sets, per job: every scheduled run is a new search / training run.
_SCHEDULED_NAME = {"tune": "tune.name", "train": "run.name"}


def _submission(args: argparse.Namespace, extra_sets: tuple[str, ...] = ()) -> Submission:

    return build_submission(
        args.job,
        args.job_args,
        config_path=args.config,
        overrides=[*args.set, *extra_sets],
        working_dir=Path(args.working_dir) if args.working_dir else None,
        env_names=args.env,
        pip=args.pip,
        submission_id=getattr(args, "submission_id", None),
    )


def _finish(jobs_client: object, job_id: str, status: str) -> int:

    if status == "SUCCEEDED":
        sys.stdout.write(f"job {job_id} SUCCEEDED\n")
        return 0
    log.error("%s", job_error(jobs_client, job_id, status))
    return 1


def _submit(args: argparse.Namespace) -> int:

    submission = _submission(args)
    jobs_client = client(args.address)
    job_id = submit(jobs_client, submission, entrypoint_num_cpus=args.entrypoint_num_cpus)
    sys.stdout.write(f"submitted {job_id}: {submission.entrypoint}\n")
    if args.no_follow:
        sys.stdout.write(f"follow it: ccnet jobs logs {job_id} --follow\n")
        return 0
    try:
        status = follow(jobs_client, job_id)
    except KeyboardInterrupt:
        sys.stdout.write(f"\nstopped following; the job goes on. Stop it: ccnet jobs stop {job_id}\n")
        return interrupts.exit_status()
    return _finish(jobs_client, job_id, status)


def _jobs(args: argparse.Namespace) -> int:

    jobs_client = client(args.address)
    if args.jobs_command == "list":
        sys.stdout.write(jobs_table(jobs_client) + "\n")
        return 0
    if args.jobs_command == "logs":
        if args.follow:
            return _finish(jobs_client, args.job_id, follow(jobs_client, args.job_id))
        sys.stdout.write(jobs_client.get_job_logs(args.job_id))
        return 0
    was_running = jobs_client.stop_job(args.job_id)
    status = (
        wait(jobs_client, args.job_id, timeout=args.timeout)
        if was_running
        else (jobs_client.get_job_status(args.job_id).value)
    )
    sys.stdout.write(f"job {args.job_id} {status}\n")
    return 0


def _schedule(args: argparse.Namespace) -> int:

    schedule = parse_cron(args.cron)
    name_key = _SCHEDULED_NAME.get(args.job)
    _submission(args)  # a bad job, config or value fails now, not at the first fire time
    jobs_client = client(args.address)

    def submit_run(run_id: str) -> str:
        extra = (f"{name_key}=scheduled-{run_id}",) if name_key else ()
        return submit(jobs_client, _submission(args, extra))

    timezone = ZoneInfo(args.timezone) if args.timezone != "UTC" else dt.UTC
    submitted = run_schedule(
        schedule,
        submit_run,
        lambda job_id: is_running(jobs_client, job_id),
        timezone=timezone,
        max_runs=args.max_runs,
    )
    sys.stdout.write("".join(f"submitted {job_id}\n" for job_id in submitted))
    return 0


def _add_submission_arguments(parser: argparse.ArgumentParser, job_names: list[str]) -> None:
    parser.add_argument("job", choices=job_names, help="a module of jobs/")
    parser.add_argument("-c", "--config", help="YAML config inside the working dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--address", help="the job server, http://HEAD:8265 (default: RAY_ADDRESS)")
    parser.add_argument("--working-dir", help="uploaded as the job's working dir (default: the current one)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="forward this environment variable's value too (secrets are refused)",
    )
    parser.add_argument(
        "--pip",
        action="store_true",
        help="have the cluster install the pinned requirements (for images without them)",
    )


def add_job_commands(commands: argparse._SubParsersAction) -> None:

    names = job_names()
    submit = commands.add_parser("submit", help="submit a job to a Ray cluster (Jobs API) and follow it")
    _add_submission_arguments(submit, names)
    submit.add_argument("--no-follow", action="store_true", help="return once submitted")
    submit.add_argument("--submission-id", help="default: ccnet-JOB-UTCTIME-RANDOM")
    submit.add_argument(
        "--entrypoint-num-cpus", type=at_least(0, float), help="CPUs reserved for the job's driver"
    )
    submit.set_defaults(run=_submit)

    jobs = commands.add_parser("jobs", help="list, read and stop submitted jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_commands.add_parser("list", help="the cluster's jobs, newest first")
    logs = jobs_commands.add_parser("logs", help="a job's output")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="until it ends; exit 1 unless it succeeded")
    stop = jobs_commands.add_parser("stop", help="stop a job and wait until it has stopped")
    stop.add_argument("job_id")
    stop.add_argument(
        "--timeout", type=at_least(0, float), default=60.0, help="seconds to wait for it to stop"
    )
    for parser in (listing, logs, stop):
        parser.add_argument("--address", help="the job server, http://HEAD:8265 (default: RAY_ADDRESS)")
    jobs.set_defaults(run=_jobs)

    schedule = commands.add_parser("schedule", help="submit a job at every time a cron line matches")
    schedule.add_argument("cron", help='five fields, e.g. "0 2 * * 6" (Saturdays 02:00)')
    _add_submission_arguments(schedule, names)
    schedule.add_argument("--timezone", default="UTC", help="of the cron line, e.g. Europe/Berlin")
    schedule.add_argument(
        "--max-runs", type=at_least(1), help="stop after this many fire times (default: never)"
    )
    schedule.set_defaults(run=_schedule)
