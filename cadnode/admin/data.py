"""What the dashboard's pages show, read from the database as plain rows for the templates."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from cadnode.admin.metrics import STAGES, job_times, stage_seconds
from cadnode.core.audit import aware
from cadnode.core.db import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Publication,
    PublicationState,
    Result,
    Study,
    StudyPriority,
    utcnow,
)
from cadnode.infer.answers import SegmentAnswer, parse_answer, summary

FLOW = ("received", "complete", "routed", "inferred", "encoded", "delivered")


@dataclass
class Finding:
    result_id: int
    engine: str
    version: str
    task: str
    text: str  # e.g. "abnormal", "ruled out", "pneumothorax (12% of hemithorax)"
    probability: float | None
    positive: bool
    source_uid: str


@dataclass
class JobRow:
    job: Job
    study_uid: str
    engines: list[str]
    findings: list[Finding]
    worklist_priority: str | None
    steps: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    # A shadow engine version's answers: shown apart, marked shadow, never as results.
    shadow_findings: list[Finding] = field(default_factory=list)

    @property
    def received_at(self) -> dt.datetime:
        return aware(self.job.first_instance_at)


def describe(result: Result) -> Finding:
    """One line for an engine's answer, whatever its task (cadnode.infer.answers)."""
    answer = parse_answer(result.answer)
    if isinstance(answer, SegmentAnswer):  # the most confident segment shown
        present = [s.probability for s in answer.statements() if s.reached]
        probability = max(present, default=None)
    else:
        probability = answer.probability
    assert result.id is not None
    return Finding(
        result_id=result.id,
        engine=result.engine,
        version=result.engine_version,
        task=answer.task,
        text=summary(answer),
        probability=probability,
        positive=answer.positive,
        source_uid=result.sop_instance_uid,
    )


def job_rows(session: Session, limit: int = 200, job_id: int | None = None) -> list[JobRow]:
    """The latest jobs, newest first, with their results and per-stage times."""
    query = select(Job, Study.study_uid).join(Study, Study.id == Job.study_id)  # type: ignore[arg-type]
    if job_id is not None:
        query = query.where(Job.id == job_id)
    rows = []
    for job, study_uid in session.exec(query.order_by(col(Job.id).desc()).limit(limit)):
        results = session.exec(select(Result).where(Result.job_id == job.id)).all()
        latest = session.exec(
            select(StudyPriority.level)
            .where(StudyPriority.study_id == job.study_id)
            .order_by(col(StudyPriority.id).desc())
        ).first()
        steps = {
            stage: values[0]
            for stage, values in stage_seconds(job_times(session, job_id=job.id)).items()
            if values
        }
        rows.append(
            JobRow(
                job=job,
                study_uid=study_uid,
                engines=list(dict.fromkeys(str(s.get("engine")) for s in job.pipeline)),
                findings=[describe(r) for r in results if not r.shadow],
                shadow_findings=[describe(r) for r in results if r.shadow],
                worklist_priority=None if latest is None else str(latest),
                steps=steps,
            )
        )
    return rows


@dataclass
class JobDetail:
    row: JobRow
    timeline: list[tuple[str, dt.datetime, float | None]]  # state, when, seconds since previous
    instances: list[Instance]
    deliveries: list[Delivery]
    priorities: list[StudyPriority]


def job_detail(session: Session, job_id: int) -> JobDetail | None:
    rows = job_rows(session, limit=1, job_id=job_id)
    if not rows:
        return None
    row = rows[0]
    [moments] = job_times(session, job_id=job_id)
    timeline: list[tuple[str, dt.datetime, float | None]] = []
    previous: dt.datetime | None = None
    for state, when in sorted(moments.items(), key=lambda item: item[1]):
        since = None if previous is None else (when - previous).total_seconds()
        timeline.append((state, when, since))
        previous = when
    return JobDetail(
        row=row,
        timeline=timeline,
        instances=list(session.exec(select(Instance).where(Instance.job_id == job_id))),
        deliveries=list(session.exec(select(Delivery).where(Delivery.job_id == job_id))),
        priorities=list(
            session.exec(
                select(StudyPriority)
                .where(StudyPriority.study_id == row.job.study_id)
                .order_by(col(StudyPriority.id))
            )
        ),
    )


@dataclass
class Failures:
    dead_letters: list[Delivery]
    failed_publications: list[Publication]
    failed_jobs: list[Job]
    depths: dict[tuple[str, str], int]  # (state, priority class) -> jobs


def failures(session: Session) -> Failures:
    return Failures(
        dead_letters=list(
            session.exec(select(Delivery).where(Delivery.state == DeliveryState.failed))
        ),
        failed_publications=list(
            session.exec(select(Publication).where(Publication.state == PublicationState.failed))
        ),
        failed_jobs=list(
            session.exec(
                select(Job).where(Job.state == JobState.failed).order_by(col(Job.id).desc())
            )
        ),
        depths=Counter((job.state.value, job.priority.value) for job in session.exec(select(Job))),
    )


def studies_per_hour(session: Session, hours: int = 24) -> list[tuple[dt.datetime, int]]:
    """Studies first seen in each of the last `hours` hours, oldest first."""
    now = utcnow().replace(minute=0, second=0, microsecond=0)
    start = now - dt.timedelta(hours=hours - 1)
    counts: Counter[dt.datetime] = Counter()
    for created in session.exec(select(Study.created_at).where(Study.created_at >= start)):
        counts[aware(created).replace(minute=0, second=0, microsecond=0)] += 1
    hours_shown = [start + dt.timedelta(hours=h) for h in range(hours)]
    return [(hour, counts[hour]) for hour in hours_shown]


def latency_percentiles(session: Session) -> dict[str, dict[str, float]]:
    """Per stage: p50, p90 and p99 of its seconds over every job, and how many jobs."""
    table = {}
    for stage, values in stage_seconds(job_times(session)).items():
        if values:
            ordered = sorted(values)
            table[stage] = {
                "p50": _percentile(ordered, 0.5),
                "p90": _percentile(ordered, 0.9),
                "p99": _percentile(ordered, 0.99),
                "n": float(len(ordered)),
            }
    return table


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest rank: a value that happened, not an interpolation between two."""
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


STAGE_NAMES = [stage for stage, _, _ in STAGES]
