"""The outboxes: what the stages queue to be sent, and how a failed send is retried.

Two tables, one set of rules:
- Delivery: a result object (or an original a rule forwards) for a DICOM destination. Route
  and encode queue them; dispatch sends them (cadnode/deliver/dispatch.py).
- Publication: a priority change or UPS event report for a worklist recipient. Prioritize
  and the UPS SCP queue them; publish sends them (cadnode/prioritize/publish.py).

A row is queued in the caller's session, so it commits with the change that calls for it.
A failed try is recorded with `record_failure`: the next is scheduled by the back-off
(cadnode/core/backoff.py), and at its limit the row is dead-lettered. Senders and queuers
meet only here and in the tables, never in each other's modules.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, select

from cadnode.core.backoff import Backoff
from cadnode.core.db import (
    Delivery,
    DeliveryState,
    Publication,
    PublicationChannel,
    PublicationState,
    utcnow,
)


def queue_delivery(session: Session, job_id: int, object_uid: str, destination: str) -> Delivery:
    """Queue `object_uid` (a ResultObject's or an Instance's) for `destination` (AE@host:port).

    Each destination gets each object once: queuing a pair already in the outbox returns
    that row unchanged."""
    existing = session.exec(
        select(Delivery).where(
            Delivery.object_uid == object_uid, Delivery.destination == destination
        )
    ).first()
    if existing is not None:
        return existing
    delivery = Delivery(object_uid=object_uid, job_id=job_id, destination=destination)
    session.add(delivery)
    return delivery


def queue_publication(
    session: Session,
    study_id: int,
    channel: PublicationChannel,
    destination: str,
    *,
    decision_id: int | None = None,
    payload: dict[str, Any] | None = None,
    supersede: bool = False,
) -> Publication:
    """Queue a notice about the study for one recipient on one channel.

    `supersede`: rows still pending for the same study, channel and recipient are
    superseded by this one (a RIS must end with the newest priority, not be walked through
    stale ones). UPS event reports are never superseded: each reports its own change."""
    if supersede:
        stale = session.exec(
            select(Publication).where(
                Publication.study_id == study_id,
                Publication.channel == channel,
                Publication.destination == destination,
                Publication.state == PublicationState.pending,
            )
        ).all()
        for publication in stale:
            publication.state = PublicationState.superseded
            session.add(publication)
    publication = Publication(
        study_id=study_id,
        decision_id=decision_id,
        channel=channel,
        destination=destination,
        payload=payload or {},
    )
    session.add(publication)
    return publication


def record_sent(row: Delivery | Publication) -> None:
    """Count the successful try on `row` and mark it sent. The caller commits."""
    row.attempts += 1
    row.sent_at = utcnow()
    if isinstance(row, Delivery):
        row.state = DeliveryState.sent
    else:
        row.state = PublicationState.sent


def record_failure(row: Delivery | Publication, reason: str, backoff: Backoff) -> bool:
    """Count a failed try on `row`: the next one is scheduled by `backoff`, or, at its limit,
    the row is dead-lettered (its `failed` state). True when dead-lettered. The caller commits."""
    row.attempts += 1
    row.last_error = reason
    retry_at = backoff.next_attempt_at(row.attempts)
    if retry_at is None:
        if isinstance(row, Delivery):
            row.state = DeliveryState.failed
        else:
            row.state = PublicationState.failed
        return True
    row.next_attempt_at = retry_at
    return False
