"""Pins: studies an admin keeps from housekeeping (`cadnode pin`, `cadnode unpin`).

A pin names a Study Instance UID, held or not yet (a study expected back for a second
reading can be pinned before it comes). While it stands, none of the study's files or rows,
nor the audit events naming it, are removed, whatever their age or the disk. Pinning and
unpinning are audited (`admin.pin`, `admin.unpin`) with who did it.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from sqlmodel import col, select

from cadnode.core import audit
from cadnode.core.db import AuditKind, AuditOutcome, Database, Pin, Study
from cadnode.core.files import is_valid_uid

log = structlog.get_logger("cadnode.retain")


@dataclass(frozen=True)
class PinOutcome:
    study_uid: str
    done: bool
    message: str

    def line(self) -> str:
        return f"{self.study_uid}: {self.message}"


def pin(database: Database, study_uid: str, actor: str, reason: str | None = None) -> PinOutcome:
    if not is_valid_uid(study_uid):
        return PinOutcome(study_uid, False, "not a valid UID (digits and dots, 64 at most)")
    with database.session() as session:
        if session.get(Pin, study_uid) is not None:
            return PinOutcome(study_uid, True, "pinned already")
        session.add(Pin(study_uid=study_uid, pinned_by=actor, reason=reason))
        held = session.exec(select(Study.id).where(Study.study_uid == study_uid)).first()
        session.commit()
    audit.record(
        database,
        AuditKind.admin_pin,
        actor=actor,
        outcome=AuditOutcome.ok,
        study_uid=study_uid,
        reason=reason,
        held=held is not None,
    )
    log.info("study.pinned", study=held, held=held is not None)
    where = "held here" if held is not None else "not held yet: kept when it comes"
    return PinOutcome(study_uid, True, f"pinned ({where})")


def unpin(database: Database, study_uid: str, actor: str) -> PinOutcome:
    with database.session() as session:
        found = session.get(Pin, study_uid)
        if found is None:
            return PinOutcome(study_uid, False, "not pinned")
        session.delete(found)
        session.commit()
    audit.record(
        database, AuditKind.admin_unpin, actor=actor, outcome=AuditOutcome.ok, study_uid=study_uid
    )
    log.info("study.unpinned")
    return PinOutcome(study_uid, True, "unpinned: housekeeping may remove it again")


def pins(database: Database) -> list[Pin]:
    with database.session() as session:
        return list(session.exec(select(Pin).order_by(col(Pin.pinned_at))))
