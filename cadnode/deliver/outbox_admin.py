"""The admin's hands on dispatch's outbox: list deliveries, replay dead letters, discard.

These run in the `cadnode` command, beside a running daemon or not: they change rows in
the database, and the dispatcher, which polls it (conveyor.poll_s) as well as waking on its
own timers, sends a retried delivery within seconds. Each change is a compare-and-set on the
row's state, so a delivery the dispatcher is sending at that moment is never retried or
discarded under it; each is logged (and kept in the audit trail) with who did it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import update
from sqlmodel import Session, col, select

from cadnode.core import audit
from cadnode.core.config import AnyDestination
from cadnode.core.db import (
    AuditKind,
    AuditOutcome,
    Database,
    Delivery,
    DeliveryState,
    FailureKind,
    Job,
    JobState,
    utcnow,
)

log = structlog.get_logger("cadnode.deliver.outbox_admin")

ADMIN_KINDS = {
    "retry": AuditKind.admin_delivery_retry,
    "discard": AuditKind.admin_delivery_discard,
}


@dataclass(frozen=True)
class Outcome:
    """What an admin action did to one delivery: `done`, or why not."""

    delivery: int
    done: bool
    note: str

    def line(self) -> str:
        return f"delivery {self.delivery}: {self.note}"


def delivery_rows(
    database: Database,
    state: DeliveryState | None = None,
    destinations: Mapping[str, AnyDestination] | None = None,
) -> list[dict[str, Any]]:
    """Every delivery (in `state`), each with its destination's name and, where `destinations`
    (the configuration's) still has that name, its address (`AE@host:port`, `AE@[::1]:port`)."""
    with database.session() as session:
        query = select(Delivery).order_by(col(Delivery.id))
        if state is not None:
            query = query.where(Delivery.state == state)
        return [_row(d, destinations or {}) for d in session.exec(query)]


def address_of(name: str, destinations: Mapping[str, AnyDestination]) -> str | None:
    """The configured address of the destination a delivery names; None once it is gone."""
    destination = destinations.get(name)
    return None if destination is None else str(destination)


def commitment_of(delivery: Delivery) -> str:
    """Storage Commitment, in a word: - (not asked), requested, committed, failed."""
    if delivery.committed_at is not None:
        return "committed"
    if delivery.commitment_failure is not None:
        return "failed"
    return "requested" if delivery.commitment_requested_at is not None else "-"


def retry(
    database: Database, ids: Sequence[int], actor: str, *, all_failed: bool = False
) -> list[Outcome]:
    """Dead letters (and sent ones whose Storage Commitment failed) back to pending: attempts
    reset, due now. A job failed by a dead letter goes back to encoded, to be settled again."""
    with database.session() as session:
        if all_failed:
            failed = select(Delivery.id).where(Delivery.state == DeliveryState.failed)
            ids = [int(i) for i in session.exec(failed) if i is not None]
        outcomes = [_retry_one(database, session, i, actor) for i in ids]
    return outcomes


def discard(database: Database, ids: Sequence[int], actor: str) -> list[Outcome]:
    """Pending or dead-lettered deliveries that should never go: `discarded`, with who and when."""
    with database.session() as session:
        return [_discard_one(database, session, i, actor) for i in ids]


def _retry_one(database: Database, session: Session, delivery_id: int, actor: str) -> Outcome:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        return Outcome(delivery_id, False, "no such delivery")
    commitment_failed = (
        delivery.state is DeliveryState.sent and delivery.commitment_failure is not None
    )
    previous = delivery.state
    if previous is not DeliveryState.failed and not commitment_failed:
        return Outcome(delivery_id, False, f"is {previous.value}: only failed ones are retried")
    moved = _compare_and_set(
        session,
        delivery,
        state=DeliveryState.pending,
        attempts=0,
        next_attempt_at=utcnow(),
        last_error=None,
        sent_at=None,
        commitment_transaction_uid=None,
        commitment_requested_at=None,
        commitment_requests=0,
        committed_at=None,
        commitment_failure=None,
    )
    if not moved:
        return Outcome(delivery_id, False, "changed meanwhile; not retried")
    _reopen_job(database, session, delivery.job_id)
    _record(database, "retry", delivery, actor, previous=previous.value)
    return Outcome(delivery_id, True, "pending again, due now")


def _discard_one(database: Database, session: Session, delivery_id: int, actor: str) -> Outcome:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        return Outcome(delivery_id, False, "no such delivery")
    previous = delivery.state
    if previous not in (DeliveryState.pending, DeliveryState.failed):
        return Outcome(
            delivery_id, False, f"is {previous.value}: only pending or failed are discarded"
        )
    moved = _compare_and_set(
        session,
        delivery,
        state=DeliveryState.discarded,
        discarded_by=actor,
        discarded_at=utcnow(),
    )
    if not moved:
        return Outcome(delivery_id, False, "changed meanwhile (sent?); not discarded")
    if previous is DeliveryState.failed:
        _reopen_job(database, session, delivery.job_id)  # settled again without this one
    _record(database, "discard", delivery, actor, previous=previous.value)
    return Outcome(delivery_id, True, "discarded; it will not be sent")


def _compare_and_set(session: Session, delivery: Delivery, **values: Any) -> bool:
    """Change the row only if it is still in the state it was read in."""
    moved = session.execute(
        update(Delivery)
        .where(col(Delivery.id) == delivery.id, col(Delivery.state) == delivery.state)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    session.commit()
    return True


def _reopen_job(database: Database, session: Session, job_id: int) -> None:
    """A job that its deliveries settled (failed by a dead letter, or delivered) goes back to
    encoded, where dispatch settles it again once the outbox has its answer."""
    job = session.get(Job, job_id)
    if job is None:
        return
    session.refresh(job)
    if job.state is JobState.failed and job.failure is FailureKind.dead_letter:
        database.transition(
            session, job, JobState.encoded, expect=JobState.failed, reason=None, failure=None
        )
    elif job.state is JobState.delivered:
        database.transition(session, job, JobState.encoded, expect=JobState.delivered)


def _record(
    database: Database, action: str, delivery: Delivery, actor: str, *, previous: str
) -> None:
    fields = {
        "delivery": delivery.id,
        "job": delivery.job_id,
        "destination": delivery.destination,
        "previous": previous,
        "actor": actor,
    }
    log.info(f"delivery.{action}", **fields)
    audit.record(
        database,
        ADMIN_KINDS[action],
        actor=actor,
        outcome=AuditOutcome.ok,
        address=delivery.destination,
        delivery=delivery.id,
        job=delivery.job_id,
        object_uid=delivery.object_uid,
        previous=previous,
    )


def _row(delivery: Delivery, destinations: Mapping[str, AnyDestination]) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "job": delivery.job_id,
        "object_uid": delivery.object_uid,
        "destination": delivery.destination,
        "address": address_of(delivery.destination, destinations),
        "state": delivery.state.value,
        "attempts": delivery.attempts,
        "next_attempt_at": _iso(delivery.next_attempt_at)
        if delivery.state is DeliveryState.pending
        else None,
        "last_error": delivery.last_error,
        "sent_at": _iso(delivery.sent_at),
        "discarded_by": delivery.discarded_by,
        "discarded_at": _iso(delivery.discarded_at),
        "commitment": commitment_of(delivery),
        "commitment_transaction_uid": delivery.commitment_transaction_uid,
        "commitment_requests": delivery.commitment_requests,
        "committed_at": _iso(delivery.committed_at),
        "commitment_failure": delivery.commitment_failure,
    }


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def table(rows: Sequence[dict[str, Any]]) -> str:
    """`cadnode deliveries list`, for a terminal."""
    lines = [
        f"{'ID':>5} {'JOB':>4} {'STATE':<9} {'TRIES':>5} {'COMMIT':<9} {'DESTINATION':<40} "
        "WHEN / LAST ERROR"
    ]
    for row in rows:
        when = {
            "pending": f"next {row['next_attempt_at']}",
            "sent": f"sent {row['sent_at']}",
            "discarded": f"by {row['discarded_by']} at {row['discarded_at']}",
        }.get(row["state"], "")
        detail = "  ".join(
            text for text in (when, row["last_error"] if row["state"] != "sent" else "") if text
        )
        if row["commitment_failure"]:
            detail += f"  commitment: {row['commitment_failure']}"
        destination = f"{row['destination']} ({row['address'] or 'not configured'})"
        lines.append(
            f"{row['id']:>5} {row['job']:>4} {row['state']:<9} {row['attempts']:>5} "
            f"{row['commitment']:<9} {destination:<40} {detail}"
        )
    return "\n".join(lines)
