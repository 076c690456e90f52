"""From findings to alerts: each condition is raised once, when it has lasted past its
threshold, and cleared once, when it ends; every raise and clear is one log event.

A condition found but not yet past its threshold is an Alert row without `raised_at`
(watched); one that ends before it is forgotten. The log events carry the kind, the subject
(a job state, a destination's name, a calling AE title) and the detail, never a patient.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import structlog
from sqlmodel import Session, col, select

from cadnode.core.audit import aware
from cadnode.core.db import Alert, AlertKind
from cadnode.watch.findings import Finding

log = structlog.get_logger("cadnode.watch")


def open_alerts(session: Session) -> dict[tuple[AlertKind, str], Alert]:
    """The conditions watched or raised and not yet cleared, by (kind, subject)."""
    rows = session.exec(select(Alert).where(col(Alert.cleared_at).is_(None)))
    return {(row.kind, row.subject): row for row in rows}


def reconcile(
    session: Session,
    opened: dict[tuple[AlertKind, str], Alert],
    findings: Iterable[Finding],
    now: dt.datetime,
) -> None:
    """Bring the open Alert rows in line with what was found now. The caller commits."""
    found = {finding.key: finding for finding in findings}
    for key, finding in found.items():
        row = opened.get(key)
        if row is None:
            row = Alert(kind=finding.kind, subject=finding.subject, since=finding.since)
        _update(session, row, finding, now)
    for key, row in opened.items():
        if key not in found:
            _ended(session, row, now)


def _update(session: Session, row: Alert, finding: Finding, now: dt.datetime) -> None:
    if row.raised_at is not None and not finding.lasted(now):
        _ended(session, row, now)  # it ended and began again: a new condition, next pass
        return
    row.detail = finding.detail
    session.add(row)
    if row.raised_at is not None:
        return
    row.since = finding.since
    if finding.lasted(now):
        row.raised_at = now
        session.flush()  # its id, for the log and the notifications
        log.warning(
            "alert.raised",
            alert=row.id,
            kind=row.kind.value,
            subject=row.subject,
            since=aware(row.since).isoformat(),
            detail=row.detail,
        )


def _ended(session: Session, row: Alert, now: dt.datetime) -> None:
    if row.raised_at is None:
        session.delete(row)  # watched, never raised: nothing to tell anyone
        return
    row.cleared_at = now
    session.add(row)
    log.info(
        "alert.cleared",
        alert=row.id,
        kind=row.kind.value,
        subject=row.subject,
        lasted_s=round((now - aware(row.since)).total_seconds()),
    )
