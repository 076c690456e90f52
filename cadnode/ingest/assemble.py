"""Assemble: decide when a study is complete enough to process.

A single-object input is complete on arrival (one radiograph, one multi-frame DBT volume)
and is released at once. Anything else waits for a quiet period that every new instance
restarts, unless its sender says it is done first (a `CompletionSignal`, recorded by
receive): the modality's MPPS went COMPLETED and every image it lists has arrived, or,
where configured, the association that sent the study was released. An instance arriving
after release opens a new job version (see cadnode/ingest/spool.py), so nothing is dropped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import structlog
from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    ComputedRadiographyImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
from sqlalchemy import func
from sqlmodel import Session, col, select

from cadnode.core.config import AssembleSettings
from cadnode.core.db import CompletionSignal, Database, Instance, Job, JobState, Study, utcnow

log = structlog.get_logger("cadnode.ingest.assemble")

# SOP classes whose one instance is a whole examination input.
SINGLE_OBJECT_SOP_CLASSES = frozenset(
    {
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        DigitalMammographyXRayImageStorageForPresentation,
        DigitalMammographyXRayImageStorageForProcessing,
        BreastTomosynthesisImageStorage,
    }
)


class Assembler:
    name = "assemble"

    def __init__(
        self,
        database: Database,
        settings: AssembleSettings,
        rule_quiet_period: Callable[[Session, Job], float | None] | None = None,
    ) -> None:
        self.database = database
        self.settings = settings
        self.quiet_period = dt.timedelta(seconds=settings.quiet_period_s)
        # The routing rules may ask for their own quiet period; the daemon passes how to ask.
        self.rule_quiet_period = rule_quiet_period

    def advance(self) -> float | None:
        next_due: float | None = None
        with self.database.session() as session:
            for job in self.database.jobs_in(session, JobState.received):
                wait, why = self._seconds_left(session, job)
                if wait > 0:
                    next_due = wait if next_due is None else min(next_due, wait)
                    continue
                if self.database.transition(
                    session, job, JobState.complete, expect=JobState.received
                ):
                    log.info("job.released", job=job.id, study=job.study_id, by=why)
        return next_due

    def _seconds_left(self, session: Session, job: Job) -> tuple[float, str]:
        """Seconds until the job may be released (<= 0: now), and what releases it."""
        if job.instance_count == 1:
            sop_class = session.exec(
                select(Instance.sop_class_uid).where(Instance.job_id == job.id)
            ).first()
            if sop_class in SINGLE_OBJECT_SOP_CLASSES:
                return 0.0, "single-object"
        signalled = self._signalled_by(session, job)
        if signalled:
            return 0.0, signalled
        due = job.last_instance_at + self._quiet_period(session, job)
        return (due - utcnow()).total_seconds(), "quiet-period"

    def _quiet_period(self, session: Session, job: Job) -> dt.timedelta:
        asked = self.rule_quiet_period(session, job) if self.rule_quiet_period else None
        return self.quiet_period if asked is None else dt.timedelta(seconds=asked)

    def _signalled_by(self, session: Session, job: Job) -> str | None:
        """The sender's word that the study is whole, if it has said so since its last image."""
        sources = []
        if self.settings.close_on_mpps_completed:
            sources.append("mpps")
        if self.settings.close_on_association_release:
            sources.append("association")
        if not sources:
            return None
        signals = session.exec(
            select(CompletionSignal)
            .join(Study, col(Study.study_uid) == CompletionSignal.study_uid)
            .where(Study.id == job.study_id, col(CompletionSignal.source).in_(sources))
        ).all()
        for signal in signals:
            if signal.source == "association" and signal.at >= job.last_instance_at:
                return "association-released"
            if signal.source == "mpps" and _all_arrived(session, signal.expected):
                return "mpps-completed"
        return None


def _all_arrived(session: Session, sop_instance_uids: list[str]) -> bool:
    if not sop_instance_uids:
        return True
    arrived = session.exec(
        select(func.count()).where(col(Instance.sop_instance_uid).in_(sop_instance_uids))
    ).one()
    return int(arrived) == len(set(sop_instance_uids))
