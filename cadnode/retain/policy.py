"""What housekeeping may remove: the studies whose data of one kind may go now, oldest first.

The unit is the study: its job versions share the images, the worklist priority and the
pins, and a later version's priority is decided on every version's answers. A study's data
may go only when all of this holds, for every job version of the study:

- the job is finished: delivered, ignored or failed, or encoded with no delivery at all
  (results kept locally); an encoded job with deliveries is still being delivered;
- its worklist priority has been decided (the prioritize stage reads its answers);
- none of its deliveries is unsent: pending, dead-lettered (`failed`: an admin may retry
  it), or sent to a Storage Commitment destination that has not confirmed it keeps it;
  a discarded one is settled;

and no admin has pinned the study (`cadnode pin`). A study's rows (kind `jobs`) also wait
for its worklist publications to be sent (or superseded) and for a reader holding its
workitem IN PROGRESS to let go.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, exists, func, or_
from sqlmodel import Session, col, select

from cadnode.core.audit import aware
from cadnode.core.config import RetentionSettings
from cadnode.core.db import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Pin,
    Publication,
    PublicationState,
    Result,
    ResultObject,
    Study,
    StudyPriority,
    UpsState,
    Workitem,
)


class Kind(StrEnum):
    """What housekeeping removes; each is a key of the `retention` configuration."""

    images = "images"  # received images: Instance rows and spool files
    results = "results"  # cadnode's own objects: ResultObject rows and their files
    answers = "answers"  # engine answers: Result rows and mask files
    jobs = "jobs"  # a finished study's rows, and whatever files it still has
    audit = "audit"  # audit events


class Reason(StrEnum):
    age = "age"  # older than the kind's retention age
    disk = "disk"  # the data dir's filesystem above its high-water mark


# The kinds removed by age, in the order a pass takes them (rows last: they sweep the rest).
STUDY_KINDS = (Kind.images, Kind.answers, Kind.results, Kind.jobs)
# Under disk pressure: the received images first (the bulk, and the PACS holds them), then
# the engines' masks, then cadnode's own objects (small, and what a viewer asks for).
DISK_KINDS = (Kind.images, Kind.answers, Kind.results)

FINISHED = (JobState.delivered, JobState.ignored, JobState.failed)


def max_age(settings: RetentionSettings, kind: Kind) -> dt.timedelta | None:
    age: dt.timedelta | None = getattr(settings, kind.value)
    return age


@dataclass(frozen=True)
class Candidate:
    """A study whose data of one kind may go."""

    study_id: int
    study_uid: str
    last_change: dt.datetime  # the last change of its last job version


def unsent(delivery: type[Delivery] = Delivery) -> Any:
    """A delivery not yet settled: pending, dead-lettered, or sent but not yet committed."""
    return or_(
        col(delivery.state).in_([DeliveryState.pending, DeliveryState.failed]),
        and_(
            col(delivery.state) == DeliveryState.sent,
            col(delivery.commitment_transaction_uid).is_not(None),
            col(delivery.committed_at).is_(None),
        ),
    )


def _unfinished(job: type[Job] = Job) -> Any:
    delivered_to = exists().where(col(Delivery.job_id) == col(job.id))
    return or_(
        col(job.state).not_in([*FINISHED, JobState.encoded]),
        and_(col(job.state) == JobState.encoded, delivered_to),
        ~exists().where(col(StudyPriority.job_id) == col(job.id)),
        exists().where(col(Delivery.job_id) == col(job.id), unsent()),
    )


def _holds(kind: Kind) -> Any:
    """The study still has something of `kind` to remove."""
    of_study = col(Job.study_id) == col(Study.id)
    if kind is Kind.images:
        return exists().where(col(Instance.job_id) == col(Job.id), of_study)
    if kind is Kind.results:
        return exists().where(col(ResultObject.job_id) == col(Job.id), of_study)
    if kind is Kind.answers:
        return exists().where(col(Result.job_id) == col(Job.id), of_study)
    waiting = col(Publication.state).in_([PublicationState.pending, PublicationState.failed])
    return and_(
        ~exists().where(col(Publication.study_id) == col(Study.id), waiting),
        ~exists().where(
            col(Workitem.study_id) == col(Study.id),
            col(Workitem.state) == UpsState.IN_PROGRESS,
        ),
    )


def deletable(
    session: Session,
    kind: Kind,
    *,
    older_than: dt.datetime | None,
    limit: int | None,
    among: Sequence[int] | None = None,
    skip: Sequence[int] = (),
) -> list[Candidate]:
    """Studies whose `kind` may go now, oldest first: last changed before `older_than` (None:
    any age, for the disk mark); `among` re-checks chosen ones inside the removing
    transaction; `skip`: studies a removal already failed on in this pass."""
    last_change = (
        select(func.max(Job.updated_at)).where(col(Job.study_id) == col(Study.id))
    ).scalar_subquery()
    # The cheap tests first (SQLite takes them in order): most old studies hold nothing more.
    statement = select(Study.id, Study.study_uid, last_change).where(_holds(kind))
    if among is not None:
        statement = statement.where(col(Study.id).in_(list(among)))
    if skip:
        statement = statement.where(col(Study.id).not_in(list(skip)))
    if older_than is not None:
        statement = statement.where(last_change < older_than)
    statement = statement.where(
        ~exists().where(col(Pin.study_uid) == col(Study.study_uid)),
        exists().where(col(Job.study_id) == col(Study.id)),
        ~exists().where(col(Job.study_id) == col(Study.id), _unfinished()),
    ).order_by(last_change, col(Study.id))
    if limit is not None:
        statement = statement.limit(limit)
    return [
        Candidate(study_id=study_id, study_uid=uid, last_change=aware(last))
        for study_id, uid, last in session.exec(statement).all()
        if study_id is not None
    ]
