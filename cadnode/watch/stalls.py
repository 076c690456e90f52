"""Jobs stuck: a job in one unfinished state past `alerts.job_stalled`.

One alert per state, naming its stuck jobs: a stalled stage holds every job behind it, and one
page per job would bury the cause. Time in a state counts from the job's last transition
(`Job.updated_at`); a job still receiving counts from when its quiet period ended after its
last instance. An encoded job is stalled only when dispatch is not working on it: a delivery
never tried, or every delivery settled and the job not; deliveries being retried are a
failing destination's alert (destinations.py), and a job without deliveries keeps its
results locally, finished.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Iterator

from sqlmodel import Session, col, select

from cadnode.core.audit import aware
from cadnode.core.db import AlertKind, Delivery, DeliveryState, Job, JobState
from cadnode.watch.findings import Finding, human, moment

WATCHED_STATES = (
    JobState.received,
    JobState.complete,
    JobState.routed,
    JobState.inferred,
    JobState.encoded,
)
NAMED_JOBS = 10  # jobs an alert names; the rest are counted
_CHUNK = 500  # ids per IN (...) query, well under SQLite's limit on bound values


def stalled_jobs(
    session: Session, now: dt.datetime, *, after_s: float, quiet_period_s: float
) -> list[Finding]:
    stuck: dict[JobState, list[tuple[dt.datetime, int]]] = defaultdict(list)
    for job_id, state, since in _time_in_state(session, quiet_period_s):
        if (now - since).total_seconds() >= after_s:
            stuck[state].append((since, job_id))
    encoded = stuck.get(JobState.encoded, [])
    if encoded:
        moving = _dispatch_working_on(session, [job for _, job in encoded])
        stuck[JobState.encoded] = [(since, job) for since, job in encoded if job not in moving]
    return [_finding(state, sorted(jobs), after_s) for state, jobs in stuck.items() if jobs]


def _time_in_state(
    session: Session, quiet_period_s: float
) -> Iterator[tuple[int, JobState, dt.datetime]]:
    """(job, state, since when it has been there) for each job in a watched state."""
    jobs = session.exec(select(Job).where(col(Job.state).in_(WATCHED_STATES)))
    for job in jobs:
        assert job.id is not None
        if job.state == JobState.received:
            quiet = job.quiet_period_s if job.quiet_period_s is not None else quiet_period_s
            yield job.id, job.state, aware(job.last_instance_at) + dt.timedelta(seconds=quiet)
        else:
            yield job.id, job.state, aware(job.updated_at)


def _dispatch_working_on(session: Session, job_ids: list[int]) -> set[int]:
    """The encoded jobs among `job_ids` that are not stalled: no deliveries (results kept
    locally), or each unsent delivery being retried by dispatch (tried, and pending)."""
    deliveries: dict[int, list[tuple[DeliveryState, int]]] = defaultdict(list)
    for chunk in _chunks(job_ids):
        for job_id, state, attempts in session.exec(
            select(Delivery.job_id, Delivery.state, Delivery.attempts).where(
                col(Delivery.job_id).in_(chunk)
            )
        ):
            deliveries[job_id].append((DeliveryState(state), attempts))
    working = set()
    for job_id in job_ids:
        pending = [tried for state, tried in deliveries[job_id] if state == DeliveryState.pending]
        if not deliveries[job_id] or (pending and all(tried > 0 for tried in pending)):
            working.add(job_id)
    return working


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def _finding(state: JobState, jobs: list[tuple[dt.datetime, int]], after_s: float) -> Finding:
    oldest_since, oldest = jobs[0]
    named = ", ".join(str(job) for _, job in jobs[:NAMED_JOBS])
    more = f" and {len(jobs) - NAMED_JOBS} more" if len(jobs) > NAMED_JOBS else ""
    detail = (
        f"{len(jobs)} job(s) in {state.value} for over {human(after_s)}: {named}{more}; "
        f"the longest, job {oldest}, since {moment(oldest_since)}"
    )
    return Finding(AlertKind.job_stalled, state.value, detail, oldest_since, after_s)
