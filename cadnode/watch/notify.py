"""Notifications of each alert raised and cleared: a JSON POST to `alerts.webhook_url` and
an email through `alerts.smtp` (Python's smtplib).

Each goes out once, in order (a clear never before its raise), and is recorded on the alert
(`Alert.notified`) as soon as it has: one that fails is tried again at the next check, for a
day after its event, then given up. The webhook's `Idempotency-Key` is the same on every try,
so a receiver that saw it before can drop the repeat. What is sent names the alert's kind,
subject and detail, never a patient; the log names neither the URL nor the headers (either
may hold a secret), and the SMTP password is read from its file at each send, never kept.
"""

from __future__ import annotations

import datetime as dt
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any, Protocol

import httpx
import structlog
from sqlmodel import Session, col, select

from cadnode.core.audit import aware
from cadnode.core.config import AlertSettings, SmtpSettings
from cadnode.core.db import Alert, Database
from cadnode.watch.findings import moment

log = structlog.get_logger("cadnode.watch")

GIVE_UP_AFTER = dt.timedelta(days=1)


@dataclass(frozen=True)
class Notice:
    """One alert event to tell: raised or cleared."""

    alert: Alert
    event: str  # "raised" or "cleared"
    node: str  # the node's AE title, to tell several nodes apart

    @property
    def headline(self) -> str:
        return f"[{self.node}] alert {self.event}: {self.alert.kind.value} {self.alert.subject}"

    def document(self) -> dict[str, Any]:
        alert = self.alert
        return {
            "event": f"alert.{self.event}",
            "node": self.node,
            "alert": alert.id,
            "kind": alert.kind.value,
            "subject": alert.subject,
            "detail": alert.detail,
            "since": _iso(alert.since),
            "raised_at": _iso(alert.raised_at),
            "cleared_at": _iso(alert.cleared_at),
            "text": f"{self.headline}: {alert.detail}",  # what chat webhooks show
        }


class NotifyError(Exception):
    """A notification did not go; the message says why without naming secrets."""


class Channel(Protocol):
    name: str

    def send(self, notice: Notice) -> None: ...


class WebhookChannel:
    name = "webhook"

    def __init__(self, url: str, headers: dict[str, str], timeout_s: float) -> None:
        self.url = url
        self.headers = headers
        self.timeout_s = timeout_s

    def send(self, notice: Notice) -> None:
        key = f"cadnode-alert-{notice.alert.id}-{notice.event}"
        try:
            with httpx.Client(timeout=self.timeout_s, headers=self.headers) as client:
                answer = client.post(
                    self.url, json=notice.document(), headers={"Idempotency-Key": key}
                )
        except (httpx.HTTPError, httpx.InvalidURL) as error:  # the URL may hold a secret
            raise NotifyError(f"webhook: {type(error).__name__}") from error
        if not answer.is_success:
            raise NotifyError(f"webhook: HTTP {answer.status_code}")


class EmailChannel:
    name = "email"

    def __init__(self, smtp: SmtpSettings, timeout_s: float) -> None:
        self.smtp = smtp
        self.timeout_s = timeout_s

    def send(self, notice: Notice) -> None:
        try:
            with smtplib.SMTP(self.smtp.host, self.smtp.port, timeout=self.timeout_s) as relay:
                if self.smtp.starttls:
                    relay.starttls(context=ssl.create_default_context())
                if self.smtp.username is not None and self.smtp.password_file is not None:
                    password = self.smtp.password_file.read_text().strip()
                    relay.login(self.smtp.username, password)
                relay.send_message(self.message(notice))
        except (OSError, smtplib.SMTPException) as error:
            raise NotifyError(f"email: {type(error).__name__}: {error}") from error

    def message(self, notice: Notice) -> EmailMessage:
        alert = notice.alert
        message = EmailMessage()
        message["Subject"] = notice.headline
        message["From"] = self.smtp.from_
        message["To"] = ", ".join(self.smtp.to)
        message["Date"] = format_datetime(dt.datetime.now(dt.UTC))
        message["Message-ID"] = make_msgid(f"cadnode-alert-{alert.id}-{notice.event}")
        message.set_content(
            f"{alert.detail}\n\n"
            f"kind: {alert.kind.value}\nsubject: {alert.subject}\n"
            f"since: {moment(aware(alert.since))}\n"
            f"raised: {moment(aware(alert.raised_at) if alert.raised_at else None)}\n"
            f"cleared: {moment(aware(alert.cleared_at) if alert.cleared_at else None)}\n"
            f"node: {notice.node}\n\n`cadnode alerts --all` lists this node's alerts.\n"
        )
        return message


def channels_for(settings: AlertSettings) -> list[Channel]:
    found: list[Channel] = []
    if settings.webhook_url:
        found.append(
            WebhookChannel(settings.webhook_url, settings.webhook_headers, settings.notify_timeout)
        )
    if settings.smtp is not None:
        found.append(EmailChannel(settings.smtp, settings.notify_timeout))
    return found


class Notifier:
    def __init__(self, channels: list[Channel], node: str) -> None:
        self.channels = channels
        self.node = node

    def send_due(self, database: Database, now: dt.datetime) -> None:
        """Every notification owed and not yet sent, oldest alert first."""
        if not self.channels:
            return
        with database.session() as session:
            for alert in _recent(session, now - GIVE_UP_AFTER):
                for channel in self.channels:
                    self._tell(session, alert, channel, now)

    def _tell(self, session: Session, alert: Alert, channel: Channel, now: dt.datetime) -> None:
        for event, at in (("raised", alert.raised_at), ("cleared", alert.cleared_at)):
            key = f"{event} {channel.name}"
            if at is None or key in alert.notified or aware(at) < now - GIVE_UP_AFTER:
                continue
            try:
                channel.send(Notice(alert, event, self.node))
            except NotifyError as error:
                log.warning(
                    "alert.notification_failed",
                    alert=alert.id,
                    change=event,
                    channel=channel.name,
                    error=str(error),
                )
                return  # the clear waits for its raise
            alert.notified = {**alert.notified, key: now.isoformat()}
            session.add(alert)
            session.commit()
            log.info("alert.notified", alert=alert.id, change=event, channel=channel.name)


def _recent(session: Session, cutoff: dt.datetime) -> list[Alert]:
    """Alerts raised or cleared since `cutoff`: the only ones that may still owe a notice."""
    return list(
        session.exec(
            select(Alert)
            .where((col(Alert.raised_at) >= cutoff) | (col(Alert.cleared_at) >= cutoff))
            .order_by(col(Alert.id))
        )
    )


def _iso(at: dt.datetime | None) -> str | None:
    return None if at is None else aware(at).isoformat()
