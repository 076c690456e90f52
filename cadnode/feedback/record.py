"""Finding the job a conclusion is about, and keeping the conclusions (Feedback rows).

A report or a RIS names the study by its accession number (the query index's QueryStudy
row has it, as the study's images carried it) or its Study Instance UID; the conclusion is
about the study's latest job version, whose results (live and shadow) it is measured
against. Every source ends here: one commit per report or request, one log event (no
patient identifiers: the job, the source, the counts), one audit event (which may name the
accession number).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from sqlmodel import Session, col, select

from cadnode.core import audit
from cadnode.core.db import (
    AuditKind,
    AuditOutcome,
    Conclusion,
    Database,
    Feedback,
    FeedbackSource,
    Job,
    QueryStudy,
    Study,
)

log = structlog.get_logger("cadnode.feedback")


@dataclass(frozen=True)
class Target:
    """The job a conclusion is about."""

    job_id: int
    study_uid: str


@dataclass(frozen=True)
class Said:
    """One conclusion to keep: a finding, what was concluded, and the words that decided it."""

    finding: str
    conclusion: Conclusion
    evidence: str = ""


def find_target(
    session: Session,
    *,
    accession: str = "",
    study_uid: str = "",
    job_id: int | None = None,
) -> Target | None:
    """The job named by its id, else the latest job of the study named by its UID, else by
    its accession number (the newest such study, should the RIS have reused one)."""
    if job_id is not None:
        found = session.exec(
            select(Job.id, Study.study_uid)
            .join(Study, Study.id == Job.study_id)  # type: ignore[arg-type]
            .where(Job.id == job_id)
        ).first()
        return None if found is None or found[0] is None else Target(found[0], found[1])
    if not study_uid and accession:
        study_uid = (
            session.exec(
                select(QueryStudy.study_uid)
                .join(Study, Study.study_uid == QueryStudy.study_uid)  # type: ignore[arg-type]
                .where(QueryStudy.accession_number == accession)
                .order_by(col(Study.id).desc())
            ).first()
            or ""
        )
    if not study_uid:
        return None
    latest = session.exec(
        select(Job.id)
        .join(Study, Study.id == Job.study_id)  # type: ignore[arg-type]
        .where(Study.study_uid == study_uid)
        .order_by(col(Job.version).desc())
    ).first()
    return None if latest is None else Target(latest, study_uid)


def keep(
    database: Database,
    target: Target,
    said: Sequence[Said],
    *,
    source: FeedbackSource,
    author: str,
    report_id: str = "",
    address: str | None = None,
) -> list[Feedback]:
    """Store the conclusions in one commit, then log and audit them."""
    rows = [
        Feedback(
            job_id=target.job_id,
            study_uid=target.study_uid,
            finding=item.finding,
            conclusion=item.conclusion,
            source=source,
            author=author,
            report_id=report_id,
            evidence=item.evidence,
        )
        for item in said
    ]
    with database.session() as session:
        session.add_all(rows)
        session.commit()
    log.info(
        "feedback.recorded",
        job=target.job_id,
        source=source.value,
        author=author,
        findings=len(rows),
        present=sum(item.conclusion is Conclusion.present for item in said),
    )
    kind = (
        AuditKind.admin_feedback
        if source is FeedbackSource.dashboard
        else (AuditKind.feedback_received)
    )
    audit.record(
        database,
        kind,
        actor=author,
        address=address,
        outcome=AuditOutcome.stored,
        source=source.value,
        job_id=target.job_id,
        study_uid=target.study_uid,
        report_id=report_id,
        conclusions={item.finding: item.conclusion.value for item in said},
    )
    return rows


def conclusions_of(session: Session, job_id: int) -> list[Feedback]:
    """A job's conclusions, the latest per finding (what the figures count), by finding."""
    rows = session.exec(
        select(Feedback).where(Feedback.job_id == job_id).order_by(col(Feedback.id))
    ).all()
    latest = {row.finding: row for row in rows}
    return [latest[name] for name in sorted(latest)]
