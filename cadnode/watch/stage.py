"""The watch stage: every `alerts.check_every`, look for stalls, update the alerts, notify.

It runs on the conveyor like the other stages, but on its own clock: a wake by another
stage's commit before its time is answered with the seconds left.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from sqlmodel import Session

from cadnode.core.config import Settings
from cadnode.core.db import Database, utcnow
from cadnode.core.locks import named_lock
from cadnode.watch.destinations import failing_destinations
from cadnode.watch.disk import DiskTrend, free_bytes_under
from cadnode.watch.drift_check import DriftWatch
from cadnode.watch.findings import Finding, OpenAlerts
from cadnode.watch.ledger import open_alerts, reconcile
from cadnode.watch.notify import Channel, Notifier, channels_for
from cadnode.watch.senders import StudyArrivals, silent_senders
from cadnode.watch.stalls import stalled_jobs


class Watchdog:
    name = "watch"

    def __init__(
        self,
        database: Database,
        settings: Settings,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        free_bytes: Callable[[Path], int] = free_bytes_under,
        channels: list[Channel] | None = None,
    ) -> None:
        self.database = database
        self.settings = settings
        self.alerts = settings.alerts
        self.clock = clock
        self.arrivals = StudyArrivals()
        self.disk = DiskTrend(settings.storage.data_dir, self.alerts.disk_window, free_bytes)
        self.drift = DriftWatch(settings)  # on its own clock: drift.check_every
        found = channels_for(self.alerts) if channels is None else channels
        self.notifier = Notifier(found, node=settings.dicom.ae_title)
        self._next_check: dt.datetime | None = None

    def advance(self) -> float | None:
        if not self.alerts.enabled:
            return None
        now = self.clock()
        if self._next_check is not None and now < self._next_check:
            return (self._next_check - now).total_seconds()
        # Scheduled before the pass: one that raises waits its turn, not the conveyor's poll.
        self._next_check = now + dt.timedelta(seconds=self.alerts.check_every)
        # One process among every node's at a time: an alert is raised and notified once.
        with named_lock(self.database, "watch").if_free() as mine:
            if mine:
                self.check(now)
        return self.alerts.check_every

    def check(self, now: dt.datetime) -> None:
        """One pass: sample the disk, find every condition, raise and clear, notify."""
        self.disk.sample(now)
        with self.database.session() as session:
            opened = open_alerts(session)
            reconcile(session, opened, self._findings(session, now, opened), now)
            session.commit()
        self.notifier.send_due(self.database, now)

    def _findings(self, session: Session, now: dt.datetime, opened: OpenAlerts) -> list[Finding]:
        alerts, settings = self.alerts, self.settings
        findings = stalled_jobs(
            session,
            now,
            after_s=alerts.job_stalled,
            quiet_period_s=settings.assemble.quiet_period_s,
        )
        findings += failing_destinations(
            session,
            now,
            after_s=alerts.destination_failing,
            max_attempts=settings.dispatch.max_attempts,
            destinations=settings.destinations,
            watched=opened,
        )
        history_start = now - dt.timedelta(seconds=alerts.sender_history)
        arrivals = self.arrivals.read(session, history_start)
        findings += silent_senders(arrivals, now, alerts, opened)
        disk = self.disk.finding(
            now,
            floor_bytes=settings.storage.min_free_mb * 2**20,
            horizon_s=alerts.disk_horizon,
            watched=opened,
        )
        findings += self.drift.findings(session, now, opened)
        return findings + ([disk] if disk is not None else [])
