"""Destinations failing: nothing accepted by a destination for `alerts.destination_failing`
while there was something to send.

A destination is failing while its latest tries failed: deliveries to it pending after a
failed attempt, or dead letters that used up their `dispatch.max_attempts` since its last
success (one dead-lettered at once, its file gone, says nothing about the destination). The
outbox records no time per attempt, so the failure is dated from when the watchdog first saw
it, and never before the destination's last success: any success ends the run of failures,
and a single object a destination refuses while it accepts others never raises this alert
(its job fails as a dead letter instead). The alert does not quote the deliveries' errors,
which may name a study's files: `cadnode deliveries list` shows them.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping

from sqlmodel import Session, col, select

from cadnode.core.audit import aware
from cadnode.core.config import AnyDestination
from cadnode.core.db import AlertKind, Delivery, DeliveryState
from cadnode.watch.findings import Finding, OpenAlerts, moment


def failing_destinations(
    session: Session,
    now: dt.datetime,
    *,
    after_s: float,
    max_attempts: int,
    destinations: Mapping[str, AnyDestination],
    watched: OpenAlerts,
) -> list[Finding]:
    names = _names(destinations)
    findings = []
    for column_value, failures in _failures(session).items():
        name = names.get(column_value, column_value)
        last_success = _last_success(session, column_value)
        retrying, dead = _since(failures, last_success, max_attempts)
        if not retrying and not dead:
            continue
        seen = watched.get((AlertKind.destination_failing, name))
        since = aware(seen.since) if seen is not None else now
        if last_success is not None:
            since = max(since, last_success)
        detail = (
            f"{retrying} delivery(ies) being retried and {dead} dead letter(s) since its last "
            f"success ({moment(last_success)}); their errors: cadnode deliveries list"
        )
        findings.append(Finding(AlertKind.destination_failing, name, detail, since, after_s))
    return findings


def _names(destinations: Mapping[str, AnyDestination]) -> dict[str, str]:
    """Delivery.destination -> the destination's configured name. Rows name their
    destination; rows queued by an older cadnode hold its address (AE@host:port)."""
    names = {str(destination): name for name, destination in destinations.items()}
    names.update({name: name for name in destinations})
    return names


Failure = tuple[DeliveryState, dt.datetime, int]  # state, next attempt (due) at, attempts


def _failures(session: Session) -> dict[str, list[Failure]]:
    """Per destination (as deliveries record it), its deliveries pending after a failed try
    and its dead letters: read through the state's index, as they are few."""
    rows = session.exec(
        select(Delivery.destination, Delivery.state, Delivery.next_attempt_at, Delivery.attempts)
        .where(col(Delivery.state).in_([DeliveryState.failed, DeliveryState.pending]))
        .where((col(Delivery.state) == DeliveryState.failed) | (col(Delivery.attempts) > 0))
    )
    found: dict[str, list[Failure]] = defaultdict(list)
    for destination, state, due_at, attempts in rows:
        found[destination].append((DeliveryState(state), aware(due_at), attempts))
    return found


def _last_success(session: Session, destination: str) -> dt.datetime | None:
    """When the destination last accepted an object (ix_delivery_destination_sent_at)."""
    sent = session.exec(
        select(Delivery.sent_at)
        .where(Delivery.destination == destination, col(Delivery.sent_at).is_not(None))
        .order_by(col(Delivery.sent_at).desc())
        .limit(1)
    ).first()
    return aware(sent) if sent is not None else None


def _since(
    failures: list[Failure], last_success: dt.datetime | None, max_attempts: int
) -> tuple[int, int]:
    """Deliveries being retried, and dead letters that used up their attempts since
    `last_success` (a dead letter's last try was due at its `next_attempt_at`)."""
    retrying = dead = 0
    for state, due_at, attempts in failures:
        if state == DeliveryState.pending:
            retrying += 1
        elif attempts >= max_attempts and (last_success is None or due_at >= last_success):
            dead += 1
    return retrying, dead
