"""What a detector reports: a condition, when it began, and how long it may last unalerted."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from cadnode.core.db import Alert, AlertKind


@dataclass(frozen=True)
class Finding:
    """A condition found now. It becomes an alert once it has lasted `after_s` since `since`;
    a condition not found on a later pass has ended."""

    kind: AlertKind
    subject: str
    detail: str
    since: dt.datetime
    after_s: float = 0.0

    @property
    def key(self) -> tuple[AlertKind, str]:
        return self.kind, self.subject

    def lasted(self, now: dt.datetime) -> bool:
        return (now - self.since).total_seconds() >= self.after_s


# The conditions watched or raised and not yet ended, by (kind, subject): a detector reads
# from them what the data cannot tell (when the watchdog first saw a condition).
OpenAlerts = Mapping[tuple[AlertKind, str], Alert]


def human(seconds: float) -> str:
    """A duration as people say it: 45s, 12m, 3h 5m, 2d 4h."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def moment(at: dt.datetime | None) -> str:
    """A time in alert text: UTC to the second."""
    return "never" if at is None else at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
