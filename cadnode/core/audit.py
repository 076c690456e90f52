"""The audit trail: who sent what, where results went, and what admins and the node changed.

Each event is a row (cadnode.core.db.AuditEvent) committed on its own, so an event is never lost
with the transaction of the work it describes, and recording one never fails that work: a
database error is logged (without the event's details) and swallowed. Unlike the logs, an
event's details may carry patient identifiers (the study-received event names the patient),
so the trail is read through `cadnode audit`, not shipped with the logs.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from sqlmodel import select

from cadnode.core.db import AuditEvent, AuditKind, AuditOutcome, Database, utcnow

log = structlog.get_logger("cadnode.core.audit")

# The kinds recorded (cadnode.core.db.AuditKind); `cadnode audit --kind` takes any of them, or
# a prefix such as "admin" (admin.login, admin.logout, admin.delivery.retry, ...).
ASSOCIATION = AuditKind.association
STUDY_RECEIVED = AuditKind.study_received
INSTANCE_REFUSED = AuditKind.instance_refused
RESULT_DELIVERED = AuditKind.result_delivered
RETRIEVED = AuditKind.retrieved
RULES = AuditKind.rules
ENGINE = AuditKind.engine
ADMIN = "admin"  # the prefix of the admin.* kinds

PATIENT_TAGS = ("PatientName", "PatientID", "AccessionNumber", "StudyDate")


def record(
    database: Database,
    kind: AuditKind,
    *,
    actor: str,
    outcome: AuditOutcome,
    address: str | None = None,
    **details: Any,
) -> None:
    """Store one audit event now; a failure to store it is logged, never raised."""
    event = AuditEvent(
        kind=kind, actor=actor, address=address, outcome=outcome, details=_jsonable(details)
    )
    try:
        with database.session() as session:
            session.add(event)
            session.commit()
    except Exception as error:  # the audited work has happened; say so rather than undo it
        log.error(
            "audit.not_recorded",
            kind=kind.value,
            outcome=outcome.value,
            error=type(error).__name__,
        )


def study_received(
    database: Database, path: Path, *, study_uid: str, calling_ae: str, peer: str
) -> None:
    """A study's first instance is in: who sent it, from where, and whose it is."""
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=list(PATIENT_TAGS))
        patient = {tag: str(header.get(tag, "")) for tag in PATIENT_TAGS}
    except Exception as error:  # the instance is stored; its audit says what could not be read
        patient = {"unreadable": type(error).__name__}
    record(
        database,
        STUDY_RECEIVED,
        actor=calling_ae,
        address=peer,
        outcome=AuditOutcome.stored,
        study_uid=study_uid,
        **patient,
    )


def events(
    database: Database, since: dt.datetime | None = None, kind: str | None = None
) -> Iterator[AuditEvent]:
    """Events oldest first; `kind` matches the kind itself or a dotted prefix of it."""
    query = select(AuditEvent).order_by(AuditEvent.at, AuditEvent.id)  # type: ignore[arg-type]
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    with database.session() as session:
        for event in session.exec(query):
            if kind is None or event.kind == kind or event.kind.startswith(kind + "."):
                yield event


def kinds_starting(text: str) -> list[AuditKind]:
    """The kinds whose name starts with `text` (the dashboard's filter: "admin" is every
    admin.* kind); an SQL condition on the column, as the kinds are stored by their names."""
    return [kind for kind in AuditKind if kind.value.startswith(text)]


def as_json_line(event: AuditEvent) -> str:
    return json.dumps(
        {
            "at": aware(event.at).isoformat(),
            "kind": event.kind.value,
            "actor": event.actor,
            "address": event.address,
            "outcome": event.outcome.value,
            "details": event.details,
        },
        sort_keys=False,
    )


_DURATION = re.compile(r"^(?P<n>\d+(\.\d+)?)(?P<unit>[smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """`--since`: an ISO 8601 time (UTC unless it says otherwise) or a duration back from now
    (`90s`, `15m`, `24h`, `7d`, `2w`)."""
    match = _DURATION.match(text.strip())
    if match:
        seconds = float(match["n"]) * _UNIT_S[match["unit"]]
        return (now or utcnow()) - dt.timedelta(seconds=seconds)
    try:
        return aware(dt.datetime.fromisoformat(text.strip()))
    except ValueError as error:
        raise ValueError(
            f"--since: expected an ISO 8601 time or a duration such as 24h, got {text!r}"
        ) from error


def aware(moment: dt.datetime) -> dt.datetime:
    """SQLite hands times back without their zone; cadnode stores them all in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(details, default=str)))
