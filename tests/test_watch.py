"""Watchdogs (cadnode/watch): each detector on rows in a temporary database, the senders'
rhythm, raise-once and clear, the notifications against a real HTTP receiver and a real SMTP
relay on loopback, and `cadnode alerts`. The node end to end: tests/test_watch_node.py."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlmodel import select
from structlog.testing import capture_logs

from cadnode.admin.context import AdminContext
from cadnode.admin.metrics import render
from cadnode.cli import main
from cadnode.core import audit
from cadnode.core.config import Settings, load_settings
from cadnode.core.db import (
    Alert,
    AlertKind,
    AuditEvent,
    AuditOutcome,
    Database,
    Delivery,
    DeliveryState,
    Job,
    JobState,
)
from cadnode.core.yamlfile import ConfigError
from cadnode.route import RuleSet
from cadnode.watch import Watchdog
from cadnode.watch.destinations import failing_destinations
from cadnode.watch.disk import DiskTrend
from cadnode.watch.ledger import open_alerts
from cadnode.watch.notify import EmailChannel, Notice, NotifyError, WebhookChannel
from cadnode.watch.senders import StudyArrivals, silent_senders, usual_silence
from cadnode.watch.stalls import stalled_jobs
from tests.alerting import Hooked, webhook_receiver
from tests.peers import free_port, port_open, wait_for
from tests.rows import new_job

LOCAL = dt.datetime.now().astimezone().tzinfo
# Wednesday 2 December 2026, 10:30 in the node's local time: a working morning.
WEDNESDAY = dt.datetime(2026, 12, 2, 10, 30, tzinfo=LOCAL)
HOUR = 3600.0
GIB = 2**30


@pytest.fixture(scope="module")
def empty_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "cadnode.db"
    Database(path).engine.dispose()
    return path


@pytest.fixture
def db(tmp_path: Path, empty_database: Path) -> Database:
    """A copy of one empty database: making each anew would cost most of these tests' time."""
    shutil.copyfile(empty_database, tmp_path / "cadnode.db")
    return Database(tmp_path / "cadnode.db")


def settings_for(data_dir: Path, **alerts: Any) -> Settings:
    return Settings.model_validate(
        {
            "storage": {"data_dir": str(data_dir), "min_free_mb": 1024},
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
            "results": {"destinations": ["pacs"]},
            "dispatch": {"max_attempts": 5},
            "alerts": {"job_stalled": "1h", "destination_failing": "1h", **alerts},
        }
    )


def id_of(job: Job) -> int:
    assert job.id is not None
    return job.id


def ago(now: dt.datetime, seconds: float) -> dt.datetime:
    return now - dt.timedelta(seconds=seconds)


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now


class Recorder:
    """A notification channel that keeps what it is given, failing while told to."""

    name = "recorder"

    def __init__(self) -> None:
        self.notices: list[tuple[str, str, str]] = []
        self.failing = False

    def send(self, notice: Notice) -> None:
        if self.failing:
            raise NotifyError("recorder: down")
        self.notices.append((notice.event, notice.alert.kind.value, notice.alert.subject))


def watchdog(
    db: Database, tmp_path: Path, clock: Clock, **alerts: Any
) -> tuple[Watchdog, Recorder]:
    recorder = Recorder()
    dog = Watchdog(
        db,
        settings_for(tmp_path, **alerts),
        clock=clock,
        free_bytes=lambda _path: 500 * GIB,
        channels=[recorder],
    )
    return dog, recorder


# --- jobs stuck --------------------------------------------------------------------------


def test_jobs_stuck_in_a_state_are_one_alert_per_state_naming_them(db: Database) -> None:
    now = WEDNESDAY
    with db.session() as session:
        stuck = [
            new_job(session, f"1.{n}", state=JobState.routed, updated_at=ago(now, 2 * HOUR + n))
            for n in range(3)
        ]
        new_job(session, "1.9", state=JobState.routed, updated_at=ago(now, 600))  # not yet
        new_job(session, "2.1", state=JobState.inferred, updated_at=ago(now, 5 * HOUR))
        new_job(session, "3.1", state=JobState.delivered, updated_at=ago(now, 99 * HOUR))
        new_job(session, "3.2", state=JobState.failed, updated_at=ago(now, 99 * HOUR))
        session.commit()
        found = {f.subject: f for f in stalled_jobs(session, now, after_s=HOUR, quiet_period_s=3)}
    assert set(found) == {"routed", "inferred"}  # finished states are never stuck
    routed = found["routed"]
    assert routed.kind is AlertKind.job_stalled
    assert routed.since == ago(now, 2 * HOUR + 2)  # the longest stuck
    assert routed.detail.startswith("3 job(s) in routed for over 1h: ")
    assert all(str(job.id) in routed.detail for job in stuck)


def test_a_job_still_receiving_counts_from_the_end_of_its_quiet_period(db: Database) -> None:
    now = WEDNESDAY
    with db.session() as session:
        # A rule's quiet period of 50 minutes: 1h 30m since its last image is not stuck yet.
        new_job(session, "1", last_instance_at=ago(now, 1.5 * HOUR), quiet_period_s=3000)
        new_job(session, "2", last_instance_at=ago(now, 1.5 * HOUR))  # the default 3 s
        session.commit()
        found = stalled_jobs(session, now, after_s=HOUR, quiet_period_s=3)
    [received] = found
    assert received.subject == "received" and "1 job(s)" in received.detail


def test_an_encoded_job_is_stuck_only_when_dispatch_is_not_working_on_it(db: Database) -> None:
    now = WEDNESDAY
    old = ago(now, 2 * HOUR)
    with db.session() as session:
        local = new_job(session, "1", state=JobState.encoded, updated_at=old)  # no deliveries
        retried = new_job(session, "2", state=JobState.encoded, updated_at=old)
        untried = new_job(session, "3", state=JobState.encoded, updated_at=old)
        settled = new_job(session, "4", state=JobState.encoded, updated_at=old)
        for job, state, attempts in [
            (retried, DeliveryState.pending, 3),
            (untried, DeliveryState.pending, 0),
            (settled, DeliveryState.sent, 1),
        ]:
            session.add(
                Delivery(
                    object_uid=f"9.{job.id}",
                    job_id=id_of(job),
                    destination="pacs",
                    state=state,
                    attempts=attempts,
                )
            )
        session.commit()
        [encoded] = stalled_jobs(session, now, after_s=HOUR, quiet_period_s=3)
    named = encoded.detail.split(": ")[1].split(";")[0].split(", ")
    assert sorted(named) == sorted([str(untried.id), str(settled.id)])
    assert str(local.id) not in named and str(retried.id) not in named


# --- raise once, clear once ----------------------------------------------------------------


def test_an_alert_is_raised_once_and_cleared_once_with_a_log_event_for_each(
    db: Database, tmp_path: Path
) -> None:
    clock = Clock(WEDNESDAY)
    dog, recorder = watchdog(db, tmp_path, clock, check_every="1m")
    with db.session() as session:
        job = new_job(session, "1", state=JobState.routed, updated_at=ago(clock.now, 2 * HOUR))
        session.commit()
    with capture_logs() as events:
        for _ in range(3):
            dog.advance()
            clock.advance(60)
        assert dog.advance() == 60  # a wake before its time answers with the time left
        with db.session() as session:
            db.transition(session, session.merge(job), JobState.inferred, expect=JobState.routed)
        clock.advance(60)
        dog.advance()
        clock.advance(60)
        dog.advance()
    raised = [e for e in events if e["event"] == "alert.raised"]
    cleared = [e for e in events if e["event"] == "alert.cleared"]
    assert len(raised) == 1 and len(cleared) == 1
    assert raised[0]["kind"] == "job.stalled" and raised[0]["subject"] == "routed"
    assert cleared[0]["alert"] == raised[0]["alert"]
    with db.session() as session:
        [row] = session.exec(select(Alert)).all()
    assert row.raised_at is not None and row.cleared_at is not None
    assert recorder.notices == [
        ("raised", "job.stalled", "routed"),
        ("cleared", "job.stalled", "routed"),
    ]


def test_the_metric_counts_active_alerts_per_kind(db: Database, tmp_path: Path) -> None:
    clock = Clock(WEDNESDAY)
    dog, _ = watchdog(db, tmp_path, clock)
    with db.session() as session:
        new_job(session, "1", state=JobState.routed, updated_at=ago(clock.now, 2 * HOUR))
        session.commit()
    dog.advance()
    context = _admin_context(db, tmp_path)
    text = render(context).decode()
    assert 'cadnode_alerts_active{kind="job.stalled"} 1.0' in text
    assert 'cadnode_alerts_active{kind="destination.failing"} 0.0' in text


def _admin_context(db: Database, tmp_path: Path) -> AdminContext:
    settings = settings_for(tmp_path)
    settings.storage.spool.mkdir(parents=True, exist_ok=True)
    return AdminContext(
        settings=settings,
        database=db,
        configured_engines=[],
        engines=[],
        rules=lambda: RuleSet(rules=(), version="test"),
    )


# --- destinations failing ------------------------------------------------------------------


def test_a_destination_alerts_after_failing_its_threshold_and_a_success_clears_it(
    db: Database, tmp_path: Path
) -> None:
    clock = Clock(WEDNESDAY)
    dog, recorder = watchdog(db, tmp_path, clock)
    with db.session() as session:
        job = new_job(session, "1", state=JobState.encoded, updated_at=clock.now)
        delivery = Delivery(
            object_uid="9.1", job_id=id_of(job), destination="pacs", attempts=2, last_error="x"
        )
        session.add(delivery)
        session.commit()
    dog.advance()  # first seen failing: watched, not raised
    with db.session() as session:
        [watched] = open_alerts(session).values()
    assert watched.kind is AlertKind.destination_failing and watched.subject == "pacs"
    assert watched.raised_at is None and recorder.notices == []
    clock.advance(HOUR)
    dog.advance()
    assert recorder.notices == [("raised", "destination.failing", "pacs")]
    with db.session() as session:
        sent = session.get(Delivery, delivery.id)
        assert sent is not None
        sent.state, sent.sent_at = DeliveryState.sent, clock.now
        session.add(sent)
        delivered = session.merge(job)
        delivered.state = JobState.delivered
        session.commit()
    clock.advance(60)
    dog.advance()
    assert recorder.notices[-1] == ("cleared", "destination.failing", "pacs")


def test_only_dead_letters_that_used_up_their_attempts_since_a_success_count(
    db: Database,
) -> None:
    now = WEDNESDAY
    pacs = settings_for(Path("/tmp")).destinations
    with db.session() as session:
        job = new_job(session, "1", state=JobState.failed)
        for n, (attempts, due) in enumerate([(1, now), (5, ago(now, 7200)), (5, ago(now, 60))]):
            session.add(
                Delivery(
                    object_uid=f"9.{n}",
                    job_id=id_of(job),
                    destination="pacs",
                    state=DeliveryState.failed,
                    attempts=attempts,
                    next_attempt_at=due,
                )
            )
        session.add(
            Delivery(
                object_uid="9.9",
                job_id=id_of(job),
                destination="pacs",
                state=DeliveryState.sent,
                attempts=1,
                sent_at=ago(now, 3600),
            )
        )
        session.commit()
        [found] = failing_destinations(
            session, now, after_s=HOUR, max_attempts=5, destinations=pacs, watched={}
        )
    # The one dead at once (its file gone) and the one dead before the success do not count.
    assert "0 delivery(ies) being retried and 1 dead letter(s)" in found.detail
    assert found.since == now  # first seen now, after the success an hour ago


def test_deliveries_queued_under_an_address_are_named_by_their_destination(
    db: Database,
) -> None:
    pacs = settings_for(Path("/tmp")).destinations
    with db.session() as session:
        job = new_job(session, "1", state=JobState.encoded)
        session.add(
            Delivery(
                object_uid="9", job_id=id_of(job), destination="PACS@127.0.0.1:104", attempts=1
            )
        )
        session.commit()
        [found] = failing_destinations(
            session, WEDNESDAY, after_s=HOUR, max_attempts=5, destinations=pacs, watched={}
        )
    assert found.subject == "pacs"


# --- senders' rhythm -----------------------------------------------------------------------


def working_days_every(minutes: int, until: dt.datetime, days: int = 28) -> list[dt.datetime]:
    """A modality's studies: Monday to Friday, 08:00 to 17:00 local, one every `minutes`."""
    studies = []
    first = (until - dt.timedelta(days=days)).replace(hour=8, minute=0, second=0, microsecond=0)
    moment = first
    while moment <= until:
        if moment.weekday() < 5 and 8 <= moment.hour < 17:
            studies.append(moment)
        moment += dt.timedelta(minutes=minutes)
    return studies


def test_the_usual_silence_is_learned_for_this_hour_on_this_kind_of_day() -> None:
    studies = working_days_every(12, until=WEDNESDAY)
    history = 28 * 86400
    morning = usual_silence(studies, WEDNESDAY, history, 0.9)
    assert morning is not None and morning <= 12 * 60  # never more than one gap apart
    saturday = WEDNESDAY + dt.timedelta(days=3)
    weekend = usual_silence(studies, saturday, history, 0.9)
    assert weekend is not None and weekend > 24 * HOUR  # since Friday evening
    night = WEDNESDAY.replace(hour=3)
    nightly = usual_silence(studies, night, history, 0.9)
    assert nightly is not None and nightly > 48 * HOUR  # Monday nights follow weekends


def record_studies(db: Database, sender: str, studies: list[dt.datetime]) -> None:
    with db.session() as session:
        for at in studies:
            session.add(
                AuditEvent(
                    at=at, kind=audit.STUDY_RECEIVED, actor=sender, outcome=AuditOutcome.stored
                )
            )
        session.commit()


def silent(db: Database, now: dt.datetime, **alerts: Any) -> dict[str, str]:
    settings = settings_for(Path("/tmp"), **alerts).alerts
    start = now - dt.timedelta(seconds=settings.sender_history)
    with db.session() as session:
        arrivals = StudyArrivals().read(session, start)
    found = silent_senders(arrivals, now, settings, {})
    return {f.subject: f.detail for f in found if f.lasted(now)}


def test_studies_are_read_once_then_only_what_came_since(db: Database) -> None:
    record_studies(db, "CT", [ago(WEDNESDAY, 3600), ago(WEDNESDAY, 30 * 86400)])
    arrivals = StudyArrivals()
    with db.session() as session:
        assert arrivals.read(session, ago(WEDNESDAY, 28 * 86400)) == {"CT": [ago(WEDNESDAY, 3600)]}
    # Committed later by another receiver, though it arrived earlier: still in order.
    record_studies(db, "CT", [ago(WEDNESDAY, 60), ago(WEDNESDAY, 7200)])
    record_studies(db, "MR", [ago(WEDNESDAY, 120)])
    with db.session() as session:
        later = arrivals.read(session, ago(WEDNESDAY, 5000))  # the history moved on
    assert later == {"CT": [ago(WEDNESDAY, 3600), ago(WEDNESDAY, 60)], "MR": [ago(WEDNESDAY, 120)]}


def test_a_sender_silent_past_its_rhythm_alerts_and_one_keeping_it_does_not(
    db: Database,
) -> None:
    until_nine = [s for s in working_days_every(12, WEDNESDAY) if s <= WEDNESDAY.replace(hour=9)]
    record_studies(db, "CT_QUIET", until_nine)
    record_studies(db, "CT_BUSY", working_days_every(12, WEDNESDAY))
    found = silent(db, WEDNESDAY)
    assert set(found) == {"CT_QUIET"}
    assert "no study from CT_QUIET since" in found["CT_QUIET"]
    assert "alert after 30m" in found["CT_QUIET"]  # the floor: twice 12 minutes is less
    # The same silence on a Saturday or at night is the usual one.
    assert silent(db, WEDNESDAY + dt.timedelta(days=3)) == {}
    assert silent(db, WEDNESDAY.replace(hour=3)) == {}


def test_the_morning_after_a_sender_stopped_overnight_alerts(db: Database) -> None:
    tuesday_evening = WEDNESDAY.replace(hour=8) - dt.timedelta(hours=14)
    record_studies(db, "CT", [s for s in working_days_every(12, WEDNESDAY) if s <= tuesday_evening])
    assert silent(db, WEDNESDAY.replace(hour=7, minute=30)) == {}  # before the day starts
    assert "CT" in silent(db, WEDNESDAY.replace(hour=9, minute=30))


def test_a_sender_is_learned_only_with_enough_history(db: Database) -> None:
    record_studies(db, "NEW", [ago(WEDNESDAY, 86400 * d + 7200) for d in range(1, 6)])
    assert silent(db, WEDNESDAY) == {}  # 5 studies, under sender_min_studies
    assert "NEW" in silent(db, WEDNESDAY, sender_min_studies=5, sender_min_silence="1m")
    assert silent(db, WEDNESDAY, learn_senders=False, sender_min_studies=5) == {}


def test_configured_silences_replace_learning_and_off_silences_a_sender(db: Database) -> None:
    record_studies(db, "CT", working_days_every(12, WEDNESDAY))
    record_studies(db, "MR", [ago(WEDNESDAY, 40 * 60)])
    found = silent(db, WEDNESDAY, senders={"MR": "30m", "CT": "off"})
    assert set(found) == {"MR"} and "(as configured)" in found["MR"]
    assert silent(db, WEDNESDAY, senders={"MR": "1h"}) == {}


def test_a_configured_sender_never_heard_from_alerts_once_its_silence_is_up(
    db: Database, tmp_path: Path
) -> None:
    clock = Clock(WEDNESDAY)
    dog, recorder = watchdog(db, tmp_path, clock, senders={"CR_ROOM": "30m"})
    dog.advance()
    clock.advance(31 * 60)
    dog.advance()
    assert recorder.notices == [("raised", "sender.silent", "CR_ROOM")]


def test_a_raised_sender_alert_lasts_until_the_sender_sends_again(
    db: Database, tmp_path: Path
) -> None:
    clock = Clock(WEDNESDAY)
    until_nine = [s for s in working_days_every(12, WEDNESDAY) if s <= WEDNESDAY.replace(hour=9)]
    record_studies(db, "CT", until_nine)
    dog, recorder = watchdog(db, tmp_path, clock)
    dog.advance()
    assert recorder.notices == [("raised", "sender.silent", "CT")]
    clock.advance(10 * HOUR)  # the evening: a long silence is usual now, but it never sent
    dog.advance()
    assert len(recorder.notices) == 1
    record_studies(db, "CT", [clock.now])
    clock.advance(60)
    dog.advance()
    assert recorder.notices[-1] == ("cleared", "sender.silent", "CT")


# --- the disk ------------------------------------------------------------------------------


def test_the_disk_trend_projects_the_time_to_the_watermark(tmp_path: Path) -> None:
    free = {"bytes": 20 * GIB}
    trend = DiskTrend(tmp_path, window_s=6 * HOUR, free_bytes=lambda _path: free["bytes"])
    now = WEDNESDAY
    for _ in range(13):  # every 10 minutes for two hours, 1 GiB an hour going
        trend.sample(now)
        now += dt.timedelta(minutes=10)
        free["bytes"] -= GIB // 6
    left = trend.seconds_to(GIB)
    assert left is not None and abs(left - 17 * HOUR) < 0.2 * HOUR  # 18 GiB left, less 1
    found = trend.finding(now, floor_bytes=GIB, horizon_s=24 * HOUR, watched={})
    assert found is not None and "in about 17h" in found.detail
    assert trend.finding(now, floor_bytes=GIB, horizon_s=12 * HOUR, watched={}) is None


def test_a_disk_not_filling_or_without_a_trend_yet_raises_nothing(tmp_path: Path) -> None:
    free = {"bytes": 20 * GIB}
    trend = DiskTrend(tmp_path, window_s=6 * HOUR, free_bytes=lambda _path: free["bytes"])
    trend.sample(WEDNESDAY)
    free["bytes"] -= 10 * GIB
    trend.sample(WEDNESDAY + dt.timedelta(minutes=1))
    assert trend.seconds_to(GIB) is None  # two samples a minute apart are no trend
    for minutes in range(10, 120, 10):
        free["bytes"] += GIB  # retention frees more than arrives
        trend.sample(WEDNESDAY + dt.timedelta(minutes=minutes))
    assert trend.seconds_to(GIB) is None


def test_a_raised_disk_alert_clears_only_well_past_the_horizon(
    db: Database, tmp_path: Path
) -> None:
    clock = Clock(WEDNESDAY)
    free = {"bytes": 11 * GIB}
    recorder = Recorder()
    dog = Watchdog(
        db,
        settings_for(tmp_path, disk_window="1h", disk_horizon="12h", check_every="10m"),
        clock=clock,
        free_bytes=lambda _path: free["bytes"],
        channels=[recorder],
    )
    for _ in range(7):  # 1 GiB an hour, 10 GiB above the watermark: 10h to go
        dog.advance()
        clock.advance(600)
        free["bytes"] -= GIB // 6
    assert recorder.notices == [("raised", "disk.filling", "data dir")]
    for _ in range(7):  # slower: some 15h to go, past 12h but within 18h, so it stays
        dog.advance()
        clock.advance(600)
        free["bytes"] -= int(GIB * 0.55 / 6)
    assert len(recorder.notices) == 1
    for _ in range(8):  # steady: cleared
        dog.advance()
        clock.advance(600)
    assert recorder.notices[-1] == ("cleared", "disk.filling", "data dir")


# --- notifications -------------------------------------------------------------------------


def test_a_notification_that_fails_is_tried_again_and_a_clear_never_precedes_its_raise(
    db: Database, tmp_path: Path
) -> None:
    clock = Clock(WEDNESDAY)
    dog, recorder = watchdog(db, tmp_path, clock)
    recorder.failing = True
    with db.session() as session:
        job = new_job(session, "1", state=JobState.routed, updated_at=ago(clock.now, 2 * HOUR))
        session.commit()
    with capture_logs() as events:
        dog.advance()
        with db.session() as session:
            db.transition(session, session.merge(job), JobState.inferred, expect=JobState.routed)
        clock.advance(60)
        dog.advance()  # raised and cleared, neither told
    assert recorder.notices == []
    assert [e["event"] for e in events].count("alert.notification_failed") == 2
    recorder.failing = False
    clock.advance(60)
    dog.advance()
    assert recorder.notices == [
        ("raised", "job.stalled", "routed"),
        ("cleared", "job.stalled", "routed"),
    ]
    clock.advance(60)
    dog.advance()
    assert len(recorder.notices) == 2  # each once


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[Hooked]]]:
    with webhook_receiver() as found:
        yield found


def an_alert(db: Database) -> Alert:
    with db.session() as session:
        alert = Alert(
            kind=AlertKind.destination_failing,
            subject="pacs",
            since=WEDNESDAY,
            raised_at=WEDNESDAY,
            detail="2 delivery(ies) being retried",
        )
        session.add(alert)
        session.commit()
        return alert


def test_the_webhook_posts_the_alert_as_json(
    db: Database, receiver: tuple[str, type[Hooked]]
) -> None:
    url, hooked = receiver
    channel = WebhookChannel(url, {"Authorization": "Bearer s3cret"}, timeout_s=5)
    alert = an_alert(db)
    channel.send(Notice(alert, "raised", "CADNODE"))
    [(headers, body)] = hooked.received
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["Idempotency-Key"] == f"cadnode-alert-{alert.id}-raised"
    assert body["event"] == "alert.raised" and body["kind"] == "destination.failing"
    assert body["subject"] == "pacs" and body["node"] == "CADNODE"
    assert body["text"].startswith("[CADNODE] alert raised: destination.failing pacs")
    hooked.answer = 503
    with pytest.raises(NotifyError, match="HTTP 503"):
        channel.send(Notice(alert, "cleared", "CADNODE"))
    nobody = WebhookChannel(f"http://127.0.0.1:{free_port()}/", {}, timeout_s=5)
    with pytest.raises(NotifyError, match=r"^webhook: ConnectError$"):  # no URL, no headers
        nobody.send(Notice(alert, "raised", "CADNODE"))


class Relay:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, envelope.rcpt_tos, envelope.content))
        return "250 OK"


def test_email_goes_through_an_smtp_relay_logging_in_with_the_password_file(
    db: Database, tmp_path: Path
) -> None:
    relay = Relay()
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(*args: Any) -> AuthResult:
        credentials = args[4]  # (server, session, envelope, mechanism, data)
        assert isinstance(credentials, LoginPassword)
        logins.append((credentials.login, credentials.password))
        return AuthResult(success=credentials.password == b"relay-pass", handled=False)

    port = free_port()
    controller = Controller(
        relay,
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticator,
        auth_require_tls=False,
    )
    controller.start()
    try:
        secret = tmp_path / "smtp-password"
        secret.write_text("relay-pass\n")
        smtp = {
            "host": "127.0.0.1",
            "port": port,
            "from": "cadnode@example.org",
            "to": ["pacs-admins@example.org", "oncall@example.org"],
            "username": "cadnode",
            "password_file": str(secret),
        }
        settings = settings_for(tmp_path, smtp=smtp).alerts
        assert settings.smtp is not None
        channel = EmailChannel(settings.smtp, timeout_s=5)
        wait_for(lambda: port_open(port), 5, "the relay")
        channel.send(Notice(an_alert(db), "raised", "CADNODE"))
        secret.write_text("wrong\n")
        with pytest.raises(NotifyError, match="SMTPAuthenticationError"):
            channel.send(Notice(an_alert(db), "raised", "CADNODE"))
    finally:
        controller.stop()
    [(sender, recipients, content)] = relay.messages
    assert sender == "cadnode@example.org"
    assert recipients == ["pacs-admins@example.org", "oncall@example.org"]
    message = message_from_bytes(content)
    assert message["Subject"] == "[CADNODE] alert raised: destination.failing pacs"
    assert "2 delivery(ies) being retried" in str(message.get_payload())
    assert logins[0] == (b"cadnode", b"relay-pass")


# --- configuration and `cadnode alerts` ----------------------------------------------------


def test_alert_settings_are_checked_at_load_with_their_line(tmp_path: Path) -> None:
    config = tmp_path / "cadnode.yaml"
    config.write_text("alerts:\n  job_stalled: 2 hours\n  senders: {CT: soon}\n")
    with pytest.raises(ConfigError) as refused:
        load_settings({"CADNODE_CONFIG": str(config)})
    problems = "\n".join(refused.value.problems)
    assert "cadnode.yaml:2:" in problems and "alerts.job_stalled" in problems
    assert "alerts.senders.CT" in problems
    smtp = {"host": "relay", "from": "a@b", "to": ["c@d"], "username": "u"}
    with pytest.raises(ValueError, match="username and password_file go together"):
        Settings.model_validate({"alerts": {"smtp": smtp}})


def test_cadnode_alerts_lists_the_active_and_with_all_the_recently_cleared(
    db: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = dt.datetime.now(dt.UTC)
    with db.session() as session:
        for subject, cleared in [("pacs", None), ("routed", now), ("old", ago(now, 30 * 86400))]:
            session.add(
                Alert(
                    kind=AlertKind.job_stalled,
                    subject=subject,
                    since=ago(now, 7200),
                    raised_at=ago(now, 3600),
                    cleared_at=cleared,
                    detail=f"about {subject}",
                )
            )
        session.add(Alert(kind=AlertKind.destination_failing, subject="watched", since=now))
        session.commit()
    monkeypatch.setenv("CADNODE_DATA_DIR", str(tmp_path))  # where the `db` fixture is
    assert main(["alerts", "--json"]) == 0
    assert [row["subject"] for row in json.loads(capsys.readouterr().out)] == ["pacs"]
    assert main(["alerts", "--all"]) == 0
    listed = capsys.readouterr().out
    assert "pacs" in listed and "routed" in listed and "cleared" in listed
    assert "old" not in listed and "watched" not in listed
