"""Senders gone quiet: a calling AE title silent for longer than it usually is.

A sender's studies are the audit trail's `study.received` events (one per new study, with the
calling AE title and the time), over the last `alerts.sender_history`. Its usual silence is
learned for the moment at hand: on each past day of the same kind (a working day, or a
weekend, in the node's local time) it is sampled every quarter hour within an hour either
side of this time of day, as the time since the sender's last study before that moment. A
sender is silent once the time since its last study passes `sender_factor` times the
`sender_quantile` of those samples (and `sender_min_silence`); so a CT that sends every few
minutes on weekday mornings alerts within the hour when it stops, and the same CT at night
or on a Sunday, when it is always quiet, does not. A sender is learned only after
`sender_min_studies` studies over at least three past days of the kind. `alerts.senders`
sets a sender's allowed silence outright (whatever the hour), or "off".

An alert, once raised, stays until the sender sends again (a later hour's longer usual
silence does not clear it), or until its setting turns to "off".
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

from sqlmodel import Session, col, select

from cadnode.core import audit
from cadnode.core.audit import aware
from cadnode.core.config import AlertSettings
from cadnode.core.db import AlertKind, AuditEvent
from cadnode.watch.findings import Finding, OpenAlerts, human, moment

SAMPLE_OFFSETS_MIN = range(-60, 61, 15)  # around this time of day on each past day
MIN_DAYS = 3  # past days of the kind with samples, before a rhythm is trusted


def silent_senders(
    arrivals: Mapping[str, list[dt.datetime]],
    now: dt.datetime,
    settings: AlertSettings,
    watched: OpenAlerts,
) -> list[Finding]:
    """`arrivals`: each sender's studies over the history, oldest first (StudyArrivals)."""
    watching = {subject for kind, subject in watched if kind == AlertKind.sender_silent}
    findings = []
    for sender in sorted(set(arrivals) | set(settings.senders) | watching):
        found = _silent(sender, arrivals.get(sender, []), now, settings, watched)
        if found is not None:
            findings.append(found)
    return findings


class StudyArrivals:
    """Each calling AE title's new studies since a moment, oldest first, read from the audit
    trail without the events' details (which name patients). The first read takes the whole
    history; each later one only the events recorded since (by id), and forgets those that
    fell out of the history, so a check costs what arrived since the last."""

    def __init__(self) -> None:
        self.by_sender: dict[str, list[dt.datetime]] = defaultdict(list)
        self.last_id = 0

    def read(self, session: Session, start: dt.datetime) -> dict[str, list[dt.datetime]]:
        rows = session.exec(
            select(AuditEvent.id, AuditEvent.actor, AuditEvent.at).where(
                AuditEvent.kind == audit.STUDY_RECEIVED,
                col(AuditEvent.id) > self.last_id,
                col(AuditEvent.at) >= start,
            )
        )
        for event_id, sender, at in rows:
            assert event_id is not None
            self.last_id = max(self.last_id, event_id)
            bisect.insort(self.by_sender[sender], aware(at))  # receivers commit out of order
        for sender, studies in list(self.by_sender.items()):
            del studies[: bisect.bisect_left(studies, start)]
            if not studies:
                del self.by_sender[sender]
        return self.by_sender


def _silent(
    sender: str,
    studies: list[dt.datetime],
    now: dt.datetime,
    settings: AlertSettings,
    watched: OpenAlerts,
) -> Finding | None:
    allowed = settings.senders.get(sender)
    if allowed == "off":
        return None
    last = studies[-1] if studies else None
    open_row = watched.get((AlertKind.sender_silent, sender))
    if (
        open_row is not None
        and open_row.raised_at is not None
        and (last is None or last <= aware(open_row.since))
    ):
        return _finding(sender, aware(open_row.since), 0.0, open_row.detail)  # still silent
    if isinstance(allowed, float):
        # A sender never heard from in the history is silent since the watchdog first saw it.
        since = last or (aware(open_row.since) if open_row is not None else now)
        return _over(sender, since, allowed, now, "as configured", keep_watching=last is None)
    if not settings.learn_senders or last is None or len(studies) < settings.sender_min_studies:
        return None
    usual = usual_silence(studies, now, settings.sender_history, settings.sender_quantile)
    if usual is None:
        return None
    limit = max(settings.sender_min_silence, settings.sender_factor * usual)
    return _over(sender, last, limit, now, f"its usual silence at this hour is {human(usual)}")


def _over(
    sender: str,
    since: dt.datetime,
    limit_s: float,
    now: dt.datetime,
    why: str,
    *,
    keep_watching: bool = False,
) -> Finding | None:
    silence = (now - since).total_seconds()
    if silence < limit_s and not keep_watching:
        return None
    detail = (
        f"no study from {sender} since {moment(since)} ({human(silence)}); "
        f"alert after {human(limit_s)} ({why})"
    )
    return _finding(sender, since, limit_s, detail)


def _finding(sender: str, since: dt.datetime, after_s: float, detail: str) -> Finding:
    return Finding(AlertKind.sender_silent, sender, detail, since, after_s)


def usual_silence(
    studies: Sequence[dt.datetime], now: dt.datetime, history_s: float, quantile: float
) -> float | None:
    """The `quantile` of the sender's silences sampled around this time of day on past days
    of today's kind; None until there are samples from MIN_DAYS such days."""
    workday = is_workday(now)
    samples: list[float] = []
    days = 0
    for back in range(1, int(history_s // 86400) + 1):
        day = now - dt.timedelta(days=back)
        if is_workday(day) != workday:
            continue
        moments = (day + dt.timedelta(minutes=offset) for offset in SAMPLE_OFFSETS_MIN)
        found = [s for s in (silence_at(studies, m) for m in moments) if s is not None]
        days += bool(found)
        samples.extend(found)
    return quantile_of(samples, quantile) if days >= MIN_DAYS else None


def silence_at(studies: Sequence[dt.datetime], moment: dt.datetime) -> float | None:
    """Seconds from the last study before `moment` to it; None if none came before."""
    before = bisect.bisect_right(studies, moment)
    return None if before == 0 else (moment - studies[before - 1]).total_seconds()


def is_workday(moment: dt.datetime) -> bool:
    """Monday to Friday in the node's local time, where a hospital's rhythm is kept."""
    return moment.astimezone().weekday() < 5


def quantile_of(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
