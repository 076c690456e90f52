"""Alerts as people and Prometheus see them: `cadnode alerts`, the dashboard's banner, and the
`cadnode_alerts_active` gauge."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func
from sqlmodel import Session, col, select

from cadnode.core.audit import aware
from cadnode.core.config import Settings
from cadnode.core.db import Alert, AlertKind, Database, utcnow

RECENT = dt.timedelta(days=7)  # how far back `--all` shows cleared alerts
MOST = 500  # rows `--all` lists at most


def add_alerts_command(commands: Any) -> None:
    alerts = commands.add_parser(
        "alerts", help="active watchdog alerts (--all: and those cleared in the last 7 days)"
    )
    alerts.add_argument("--all", action="store_true", help="also the recently cleared")
    alerts.add_argument("--json", action="store_true", help="one JSON document")


def alerts_command(settings: Settings, args: argparse.Namespace) -> int:
    rows = alert_rows(Database(settings.database_url), cleared_too=args.all)
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0


def alert_rows(database: Database, *, cleared_too: bool = False) -> list[dict[str, Any]]:
    """Raised alerts, newest first: the active ones, and with `cleared_too` those cleared in
    the last RECENT."""
    with database.session() as session:
        active = col(Alert.cleared_at).is_(None)
        shown = active | (col(Alert.cleared_at) >= utcnow() - RECENT) if cleared_too else active
        query = (
            select(Alert)
            .where(col(Alert.raised_at).is_not(None), shown)
            .order_by(col(Alert.raised_at).desc())
            .limit(MOST)
        )
        return [_row(alert) for alert in session.exec(query)]


def _row(alert: Alert) -> dict[str, Any]:
    return {
        "id": alert.id,
        "kind": alert.kind.value,
        "subject": alert.subject,
        "state": "active" if alert.cleared_at is None else "cleared",
        "since": _iso(alert.since),
        "raised_at": _iso(alert.raised_at),
        "cleared_at": _iso(alert.cleared_at),
        "detail": alert.detail,
        "notified": alert.notified,
    }


def _iso(at: dt.datetime | None) -> str | None:
    return None if at is None else aware(at).isoformat(timespec="seconds")


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no alerts"
    lines = [f"{'ID':>4} {'STATE':<8} {'KIND':<20} {'SUBJECT':<16} {'RAISED':<25} DETAIL"]
    for row in rows:
        lines.append(
            f"{row['id']:>4} {row['state']:<8} {row['kind']:<20} {row['subject']:<16} "
            f"{row['raised_at']:<25} {row['detail']}"
            + (f" (cleared {row['cleared_at']})" if row["cleared_at"] else "")
        )
    return "\n".join(lines)


def active_alerts(session: Session) -> list[Alert]:
    """For the dashboard's banner: every alert raised and not cleared, oldest first."""
    return list(
        session.exec(
            select(Alert)
            .where(col(Alert.raised_at).is_not(None), col(Alert.cleared_at).is_(None))
            .order_by(col(Alert.raised_at))
        )
    )


def alert_metrics(session: Session) -> Iterator[GaugeMetricFamily]:
    gauge = GaugeMetricFamily(
        "cadnode_alerts_active", "Watchdog alerts raised and not cleared, by kind", labels=["kind"]
    )
    counts = dict(
        session.exec(
            select(Alert.kind, func.count())
            .where(col(Alert.raised_at).is_not(None), col(Alert.cleared_at).is_(None))
            .group_by(col(Alert.kind))
        ).all()
    )
    for kind in AlertKind:
        gauge.add_metric([kind.value], counts.get(kind, 0))
    yield gauge
