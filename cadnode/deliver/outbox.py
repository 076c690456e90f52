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

from collections.abc import Mapping
from typing import Any

import structlog
from sqlalchemy import update
from sqlmodel import Session, col, select

from cadnode.core.backoff import Backoff
from cadnode.core.config import AnyDestination, Destination
from cadnode.core.db import (
    Database,
    Delivery,
    DeliveryState,
    Publication,
    PublicationChannel,
    PublicationState,
    utcnow,
)

log = structlog.get_logger("cadnode.deliver.outbox")


def queue_delivery(session: Session, job_id: int, object_uid: str, destination: str) -> Delivery:
    """Queue `object_uid` (a ResultObject's or an Instance's) for `destination`, the name of a
    configured destination (`destinations.NAME`, or `CADNODE_DESTINATION`).

    The row keeps the name, not the address: dispatch looks the address and options up in
    the configuration it runs with, so a PACS that moved is reached at its new address, and
    a destination removed from the configuration dead-letters what was queued for it.
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


def record_dead_letter(row: Delivery | Publication, reason: str) -> None:
    """Count a try on `row` that no retry can mend (its file is gone, its destination no
    longer configured) and dead-letter it at once. The caller commits."""
    row.attempts += 1
    row.last_error = reason
    if isinstance(row, Delivery):
        row.state = DeliveryState.failed
    else:
        row.state = PublicationState.failed


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


def legacy_destination_names(destinations: Mapping[str, AnyDestination]) -> dict[str, str]:
    """The `AE@host:port` text that rows queued before deliveries named their destination hold
    (`Delivery.destination`), mapped to the name now configured for that address. Text that
    no configured destination has is not in the map (nor has a DICOMweb one any such rows)."""
    return {
        f"{d.ae_title}@{d.host}:{d.port}": name
        for name, d in destinations.items()
        if isinstance(d, Destination)
    }


def rename_legacy_destinations(
    database: Database, destinations: Mapping[str, AnyDestination]
) -> int:
    """Give every row that still holds its destination's `AE@host:port` the name configured
    for that address; how many were renamed. Idempotent, run at each start before dispatch:
    a row whose address no configured destination has keeps its text, and is dead-lettered
    as no longer configured if it is still to be sent."""
    renamed = 0
    with database.session() as session:
        for legacy, name in legacy_destination_names(destinations).items():
            moved = session.execute(
                update(Delivery).where(col(Delivery.destination) == legacy).values(destination=name)
            )
            renamed += int(moved.rowcount)  # type: ignore[attr-defined]
        session.commit()
    if renamed:
        log.info("delivery.destinations_renamed", deliveries=renamed)
    return renamed
