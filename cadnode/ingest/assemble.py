"""Assemble: decide when a study is complete enough to process.

A single-object input is complete on arrival (one radiograph, one multi-frame DBT volume)
and is released at once. Anything else waits for a quiet period that every new instance
restarts, unless its sender says it is done first (a `CompletionSignal`, recorded by
receive): the modality's MPPS went COMPLETED and every image it lists has arrived, or,
where configured, the association that sent the study was released. An instance arriving
after release opens a new job version (see cadnode/ingest/spool.py), so nothing is dropped.

The quiet period is `assemble.quiet_period_s`, unless the routing rules set their own for
the study: route records it on the job (`Job.quiet_period_s`) from the study's first
instance, and assemble reads it there. Where rules may set one, a study whose quiet period
route has not decided yet is not released by the default's running out.

Releasing a study also makes it queryable: its instances enter the query index
(cadnode/dicom/indexing.py) in the commit that completes the job. Jobs released by a cadnode
that did not index so are indexed here too, a few per pass.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

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
from cadnode.core.db import (
    CompletionSignal,
    CompletionSource,
    Database,
    Instance,
    Job,
    JobState,
    Study,
    utcnow,
)
from cadnode.dicom.indexing import Indexer

log = structlog.get_logger("cadnode.ingest.assemble")

# How soon to look again at a study whose quiet period is over by the default but not yet
# decided by route (route's commit wakes assemble anyway; this is the fallback).
UNDECIDED_RECHECK_S = 0.25
# Jobs released without indexing (by an older cadnode) indexed per pass: each reads its
# instances' headers, and a pass must not keep new studies waiting long.
BACKFILL_JOBS = 8

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
        *,
        rule_quiet_periods: bool = False,
        indexer: Indexer | None = None,
    ) -> None:
        self.database = database
        self.settings = settings
        self.quiet_period = dt.timedelta(seconds=settings.quiet_period_s)
        # True where a route stage runs beside assemble, recording the rules' quiet periods
        # on the jobs: a study then waits for that decision before its quiet period ends.
        self.rule_quiet_periods = rule_quiet_periods
        # Indexes a study's instances for Query/Retrieve as its job completes (the node always
        # has one; None in tests of completion alone, whose instances have no files).
        self.indexer = indexer

    def advance(self) -> float | None:
        next_due: float | None = None
        with self.database.session() as session:
            for job in self.database.jobs_in(session, JobState.received):
                wait, why = self._seconds_left(session, job)
                if wait > 0:
                    next_due = wait if next_due is None else min(next_due, wait)
                    continue
                if self._complete(session, job):
                    log.info("job.released", job=job.id, study=job.study_id, by=why)
        if self.indexer and self.indexer.backfill(self.database, BACKFILL_JOBS) == BACKFILL_JOBS:
            next_due = 0.0  # more released jobs to index: come back at once
        return next_due

    def _complete(self, session: Session, job: Job) -> bool:
        """Release the job, its instances indexed in the same commit."""
        indexed: dict[str, Any] = {}
        if self.indexer is not None:
            assert job.id is not None
            self.indexer.index_job(session, job.id)
            indexed["indexed_at"] = utcnow()
        return self.database.transition(
            session, job, JobState.complete, expect=JobState.received, **indexed
        )

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
        due = job.last_instance_at + self._quiet_period(job)
        wait = (due - utcnow()).total_seconds()
        if wait <= 0 and self.rule_quiet_periods and job.quiet_period_decided_at is None:
            return UNDECIDED_RECHECK_S, "quiet-period-undecided"  # a rule may ask for longer
        return wait, "quiet-period"

    def _quiet_period(self, job: Job) -> dt.timedelta:
        """The rules' own quiet period, as route recorded it on the job, or the default."""
        asked = job.quiet_period_s
        return self.quiet_period if asked is None else dt.timedelta(seconds=asked)

    def _signalled_by(self, session: Session, job: Job) -> str | None:
        """The sender's word that the study is whole, if it has said so since its last image."""
        sources = []
        if self.settings.close_on_mpps_completed:
            sources.append(CompletionSource.mpps)
        if self.settings.close_on_association_release:
            sources.append(CompletionSource.association)
        if not sources:
            return None
        signals = session.exec(
            select(CompletionSignal)
            .join(Study, col(Study.study_uid) == CompletionSignal.study_uid)
            .where(Study.id == job.study_id, col(CompletionSignal.source).in_(sources))
        ).all()
        for signal in signals:
            if signal.source is CompletionSource.association and signal.at >= job.last_instance_at:
                return "association-released"
            if signal.source is CompletionSource.mpps and _all_arrived(session, signal.expected):
                return "mpps-completed"
        return None


def _all_arrived(session: Session, sop_instance_uids: list[str]) -> bool:
    if not sop_instance_uids:
        return True
    arrived = session.exec(
        select(func.count()).where(col(Instance.sop_instance_uid).in_(sop_instance_uids))
    ).one()
    return int(arrived) == len(set(sop_instance_uids))
