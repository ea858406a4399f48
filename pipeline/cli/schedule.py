"""Searches on a schedule for a plain Ray cluster: a cron line, and a loop that submits a job at each match.

    ccnet schedule "0 2 * * 6" tune -c configs/ccnet_r50-d8_camvid-360x360_20k.yaml --address http://HEAD:8265

It behaves like the Kubernetes CronJob of ``infra/k8s/cronjob-tune.yaml``: at each time the cron line
matches (UTC unless ``--timezone``), it submits the job with a unique ``tune.name=scheduled-<YYYYmmdd-HHMM>``
(so every run is a new search with its own MLflow runs and checkpoints), and it skips a run while the job it
submitted before is still going. Cron lines are the standard five fields (minute hour day-of-month month
day-of-week) with lists, ranges, steps and month/day names; as in cron, when both day fields are restricted a
day matching either one matches.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_FIELDS = ("minute", "hour", "day of month", "month", "day of week")
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))  # day of week: 0 and 7 are both Sunday
_NAMES: tuple[dict[str, int], ...] = (
    {},
    {},
    {},
    {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
    {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())},
)
_HORIZON_DAYS = 366 * 5  # "30 2 31 2 *" (31 February) never matches: give up after this long


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron line: the allowed values of each field."""

    line: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool  # the day-of-month field is not "*"
    weekdays_restricted: bool

    def day_matches(self, when: dt.datetime) -> bool:
        """Whether the line selects the day of ``when`` (its month and its day fields)."""
        day_of_month = when.day in self.days
        day_of_week = (when.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            day_ok = day_of_month or day_of_week  # cron's rule: either day field
        else:
            day_ok = day_of_month and day_of_week
        return when.month in self.months and day_ok

    def next_after(self, when: dt.datetime) -> dt.datetime:
        """The first matching minute strictly after ``when`` (wall-clock time in ``when``'s tzinfo).

        Raises:
            ValueError: the line matches no date in the next five years (e.g. 31 February).
        """
        candidate = when.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        limit = candidate + dt.timedelta(days=_HORIZON_DAYS)
        while candidate < limit:
            if not self.day_matches(candidate):
                candidate = (candidate + dt.timedelta(days=1)).replace(hour=0, minute=0)
            elif candidate.hour not in self.hours:
                candidate = (candidate + dt.timedelta(hours=1)).replace(minute=0)
            elif candidate.minute not in self.minutes:
                candidate += dt.timedelta(minutes=1)
            else:
                return candidate
        raise ValueError(f"cron line {self.line!r} matches no date in the next five years")


def _parse_field(text: str, index: int, line: str) -> frozenset[int]:
    low, high = _RANGES[index]
    names = _NAMES[index]
    values: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        if slash and (not step_text.isdigit() or int(step_text) == 0):
            raise ValueError(f"cron line {line!r}: bad step in {part!r} ({_FIELDS[index]})")
        step = int(step_text) if slash else 1
        if base == "*":
            start, stop = low, high
        else:
            bounds = [str(names.get(bound.lower(), bound)) for bound in base.split("-")]
            if len(bounds) > 2 or not all(bound.isdigit() and low <= int(bound) <= high for bound in bounds):
                raise ValueError(f"cron line {line!r}: {part!r} outside {low}-{high} ({_FIELDS[index]})")
            start, stop = int(bounds[0]), int(bounds[-1])
            if start > stop:
                raise ValueError(f"cron line {line!r}: empty range {part!r} ({_FIELDS[index]})")
            if slash and len(bounds) == 1:
                stop = high  # "5/15" is "5-59/15"
        values.update(range(start, stop + 1, step))
    return frozenset(values)


def parse_cron(line: str) -> CronSchedule:
    """Parse a standard five-field cron line.

    Raises:
        ValueError: naming the line and the field at fault (macros such as ``@daily`` are refused).
    """
    fields = str(line).split()
    if len(fields) != 5:
        raise ValueError(
            f"cron line {line!r}: {len(fields)} fields, expected 5 "
            "(minute hour day-of-month month day-of-week)"
        )
    minutes, hours, days, months, weekdays = (_parse_field(f, i, line) for i, f in enumerate(fields))
    return CronSchedule(
        line=line,
        minutes=minutes,
        hours=hours,
        days=days,
        months=months,
        weekdays=frozenset(day % 7 for day in weekdays),
        days_restricted=fields[2] != "*",
        weekdays_restricted=fields[4] != "*",
    )


def run_id(when: dt.datetime) -> str:
    """The scheduled run's id: its UTC date and minute, as the Kubernetes CronJob names its RayJobs."""
    return when.astimezone(dt.UTC).strftime("%Y%m%d-%H%M")


def _now(timezone: dt.tzinfo) -> dt.datetime:
    return dt.datetime.now(timezone)


def run_schedule(
    schedule: CronSchedule,
    submit: Callable[[str], str],
    is_running: Callable[[str], bool],
    *,
    timezone: dt.tzinfo = dt.UTC,
    max_runs: int | None = None,
    now: Callable[[], dt.datetime] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Call ``submit(run_id)`` at every time ``schedule`` matches; returns the ids of the submitted jobs.

    Args:
        submit: submits one run and returns its job id.
        is_running: whether a job id is still pending or running; a run is skipped while the previous one is.
        max_runs: stop after this many fire times (submitted or skipped); None runs forever.
        now, sleep: the clock (tests pass their own).
    """
    clock = now or (lambda: _now(timezone))
    submitted: list[str] = []
    fired = 0
    while max_runs is None or fired < max_runs:
        due = schedule.next_after(clock())
        log.info("next run of %r at %s", schedule.line, due.isoformat())
        while (wait := (due - clock()).total_seconds()) > 0:
            sleep(min(wait, 60.0))  # wake up at least every minute: the clock may jump (suspend, NTP)
        fired += 1
        if submitted and is_running(submitted[-1]):
            log.warning("skipping the run of %s: job %s is still running", due.isoformat(), submitted[-1])
            continue
        submitted.append(submit(run_id(due)))
        log.info("submitted job %s for the run of %s", submitted[-1], due.isoformat())
    return submitted
