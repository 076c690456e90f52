"""Assemble: decide when a study is complete enough to process.

A single-object input is complete on arrival (one radiograph, one multi-frame DBT volume)
and is released at once; anything else waits for a quiet period that every new instance
restarts. An instance arriving after release opens a new job version (see receive).
"""

from __future__ import annotations

import datetime as dt

from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    ComputedRadiographyImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
from sqlmodel import Session, select

from cadnode.db import Database, Instance, Job, JobState, utcnow

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

    def __init__(self, database: Database, quiet_period_s: float) -> None:
        self.database = database
        self.quiet_period = dt.timedelta(seconds=quiet_period_s)

    def advance(self) -> float | None:
        next_due: float | None = None
        with self.database.session() as session:
            for job in self.database.jobs_in(session, JobState.received):
                wait = self._seconds_left(session, job)
                if wait > 0:
                    next_due = wait if next_due is None else min(next_due, wait)
                    continue
                self.database.transition(session, job, JobState.complete, expect=JobState.received)
        return next_due

    def _seconds_left(self, session: Session, job: Job) -> float:
        if job.instance_count == 1:
            sop_class = session.exec(
                select(Instance.sop_class_uid).where(Instance.job_id == job.id)
            ).first()
            if sop_class in SINGLE_OBJECT_SOP_CLASSES:
                return 0.0
        due = job.last_instance_at + self.quiet_period
        return (due - utcnow()).total_seconds()
