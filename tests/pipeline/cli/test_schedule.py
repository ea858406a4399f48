"""Cron lines and the schedule loop of ``ccnet schedule``: next fire times against dates worked out by hand,
cron's either-day rule, bad lines refused naming the field, and the loop's skip-while-running rule."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from pipeline.cli.schedule import parse_cron, run_id, run_schedule

UTC = dt.UTC


def at(text: str, tz: dt.tzinfo = UTC) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=tz)


@pytest.mark.parametrize(
    ("line", "after", "expected"),
    [
        # 2026-12-01 is a Tuesday.
        ("0 2 * * 6", "2026-12-01 08:30", "2026-12-05 02:00"),  # the CronJob's Saturday 02:00
        ("0 2 * * sat", "2026-12-05 02:00", "2026-12-12 02:00"),  # strictly after a fire time
        ("*/15 * * * *", "2026-12-01 08:30:05", "2026-12-01 08:45"),
        ("5/20 * * * *", "2026-12-01 08:30", "2026-12-01 08:45"),  # 5, 25, 45
        ("30 23 31 * *", "2026-11-01 00:00", "2026-12-31 23:30"),  # November has no 31st
        ("0 0 29 feb *", "2026-03-01 00:00", "2028-02-29 00:00"),  # the next leap day
        ("0 12 * * 0", "2026-12-01 00:00", "2026-12-06 12:00"),  # Sunday as 0
        ("0 12 * * 7", "2026-12-01 00:00", "2026-12-06 12:00"),  # and as 7
        ("0 9 1-7 * mon", "2026-12-01 10:00", "2026-12-02 09:00"),  # either day field: the 2nd (a Wed)
        ("0 9 * jan-mar mon-fri", "2026-12-01 00:00", "2027-01-01 09:00"),  # 2027-01-01 is a Friday
        ("59 23 31 dec *", "2026-12-31 23:59", "2027-12-31 23:59"),
    ],
)
def test_next_fire_time(line: str, after: str, expected: str) -> None:
    assert parse_cron(line).next_after(at(after)) == at(expected)


def test_wall_clock_time_in_a_timezone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    due = parse_cron("0 2 * * *").next_after(at("2027-03-28 12:00", berlin))  # the day summer time starts
    assert due == at("2027-03-29 02:00", berlin) and due.utcoffset() == dt.timedelta(hours=2)
    assert run_id(due) == "20270329-0000"  # ids are UTC, as the Kubernetes CronJob names its RayJobs


@pytest.mark.parametrize(
    ("line", "names"),
    [
        ("0 2 * *", "4 fields"),
        ("61 * * * *", "minute"),
        ("0 24 * * *", "hour"),
        ("* * 0 * *", "day of month"),
        ("* * * 13 *", "month"),
        ("* * * * 8", "day of week"),
        ("*/0 * * * *", "bad step"),
        ("5-1 * * * *", "empty range"),
        ("@daily", "1 fields"),
        ("0 2 * * funday", "day of week"),
    ],
)
def test_bad_lines_name_the_field(line: str, names: str) -> None:
    with pytest.raises(ValueError, match=names) as error:
        parse_cron(line)
    assert repr(line) in str(error.value)


def test_a_line_that_never_matches_is_refused() -> None:
    with pytest.raises(ValueError, match="matches no date"):
        parse_cron("0 0 31 feb *").next_after(at("2026-12-01 00:00"))


class FakeClock:
    """Time that passes only when the loop sleeps."""

    def __init__(self, start: dt.datetime) -> None:
        self.time = start
        self.slept: list[float] = []

    def now(self) -> dt.datetime:
        return self.time

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.time += dt.timedelta(seconds=seconds)


def test_loop_submits_at_each_fire_time_and_skips_while_running() -> None:
    clock = FakeClock(at("2026-12-01 08:29:30"))
    calls: list[tuple[str, dt.datetime]] = []
    running = {"job-1"}  # the first job is still running at the second fire time, then ends

    def submit(run: str) -> str:
        calls.append((run, clock.now()))
        return f"job-{len(calls)}"

    def is_running(job_id: str) -> bool:
        return job_id in running and not running.discard(job_id)  # running once, finished when asked again

    jobs = run_schedule(
        parse_cron("*/30 * * * *"), submit, is_running, max_runs=3, now=clock.now, sleep=clock.sleep
    )
    assert jobs == ["job-1", "job-2"]
    # 08:30 submitted; 09:00 skipped (job-1 still running); 09:30 submitted.
    assert calls == [("20261201-0830", at("2026-12-01 08:30")), ("20261201-0930", at("2026-12-01 09:30"))]
    assert max(clock.slept) <= 60.0  # wakes at least once a minute
