"""A study's priority as the admin sees it: current level, every decision, every publication."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from cadnode.core.db import Publication, StudyPriority


def study_priority(session: Session, study_id: int | None) -> dict[str, Any]:
    decisions = session.exec(
        select(StudyPriority)
        .where(StudyPriority.study_id == study_id)
        .order_by(col(StudyPriority.id))
    ).all()
    publications = session.exec(
        select(Publication).where(Publication.study_id == study_id).order_by(col(Publication.id))
    ).all()
    current = decisions[-1] if decisions else None
    return {
        "priority": current.level.value if current else None,
        "priority_reason": current.reason if current else None,
        "priority_history": [
            {
                "at": d.decided_at.isoformat(),
                "priority": d.level.value,
                "reason": d.reason,
                "rule": d.rule,
                "job": d.job_id,
                "changed": d.changed,
            }
            for d in decisions
        ],
        "publications": [
            {
                "channel": p.channel.value,
                "destination": p.destination,
                "state": p.state.value,
                "attempts": p.attempts,
                "last_error": p.last_error,
                "sent_at": p.sent_at.isoformat() if p.sent_at else None,
            }
            for p in publications
        ],
    }


def history_line(row: dict[str, Any]) -> str:
    """The changes, oldest first: `MEDIUM 10:02:03 (arrival) -> HIGH 10:02:04 (chest-urgent)`."""
    changes = [h for h in row.get("priority_history", []) if h["changed"]]
    return " -> ".join(f"{h['priority']} {h['at'][11:19]} ({h['rule']})" for h in changes)
