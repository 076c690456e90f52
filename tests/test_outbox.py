"""The outbox module (queue, record a failure) and the one back-off schedule."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from sqlmodel import select

from cadnode.core.backoff import Backoff
from cadnode.core.config import DispatchSettings, EngineSettings
from cadnode.core.db import (
    Database,
    Delivery,
    DeliveryState,
    Publication,
    PublicationChannel,
    PublicationState,
    utcnow,
)
from cadnode.deliver.outbox import queue_delivery, queue_publication, record_failure
from tests.rows import new_job

NOW = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


# --- back-off --------------------------------------------------------------------------------


def test_the_delay_doubles_from_the_initial_one_up_to_the_ceiling() -> None:
    backoff = Backoff(initial_s=1.0, max_s=5.0, max_attempts=10)
    assert [backoff.delay_s(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_without_a_ceiling_the_delay_keeps_doubling_and_stays_finite() -> None:
    backoff = Backoff(initial_s=5.0, max_attempts=3)
    assert backoff.max_s == math.inf
    assert [backoff.delay_s(n) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert math.isfinite(backoff.delay_s(10_000))  # no overflow after very many tries


def test_the_next_attempt_is_scheduled_until_the_limit() -> None:
    backoff = Backoff(initial_s=2.0, max_s=60.0, max_attempts=3)
    assert backoff.next_attempt_at(1, NOW) == NOW + dt.timedelta(seconds=2)
    assert backoff.next_attempt_at(2, NOW) == NOW + dt.timedelta(seconds=4)
    assert backoff.next_attempt_at(3, NOW) is None  # the third try was the last
    assert backoff.gives_up(3) and not backoff.gives_up(2)
    later = backoff.next_attempt_at(1)
    assert later is not None and later.tzinfo is not None  # now, in UTC, when not given


@pytest.mark.parametrize(
    "arguments",
    [
        {"initial_s": 0, "max_attempts": 1},
        {"initial_s": 1, "max_attempts": 0},
        {"initial_s": 1, "max_attempts": 1, "max_s": -1},
    ],
)
def test_a_schedule_that_makes_no_sense_is_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**arguments)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Backoff(initial_s=1, max_attempts=1).delay_s(0)


def test_every_retry_schedule_is_the_one_back_off() -> None:
    dispatch = DispatchSettings(max_attempts=4, backoff_initial_s=0.5, backoff_max_s=1.5)
    assert dispatch.backoff == Backoff(initial_s=0.5, max_s=1.5, max_attempts=4)
    engines = EngineSettings(max_attempts=3, retry_backoff_s=1.0)
    assert engines.backoff == Backoff(initial_s=1.0, max_attempts=3)
    assert [engines.backoff.delay_s(n) for n in (1, 2)] == [1.0, 2.0]  # infer's retry_in_s


# --- queuing ---------------------------------------------------------------------------------


def test_a_delivery_is_queued_once_per_object_and_destination(database: Database) -> None:
    with database.session() as session:
        job = new_job(session, "1.2.3")
        assert job.id is not None
        first = queue_delivery(session, job.id, "1.2.3.4", "PACS@127.0.0.1:104")
        again = queue_delivery(session, job.id, "1.2.3.4", "PACS@127.0.0.1:104")
        other = queue_delivery(session, job.id, "1.2.3.4", "ARCHIVE@127.0.0.1:105")
        session.commit()
        assert again is first and other is not first
        rows = session.exec(select(Delivery)).all()
    assert len(rows) == 2
    assert {r.destination for r in rows} == {"PACS@127.0.0.1:104", "ARCHIVE@127.0.0.1:105"}
    assert all(r.state is DeliveryState.pending and r.attempts == 0 for r in rows)


def test_queuing_a_publication_supersedes_only_when_asked(database: Database) -> None:
    with database.session() as session:
        job = new_job(session, "1.2.3")
        study = job.study_id
        old = queue_publication(session, study, PublicationChannel.hl7, "ris", supersede=True)
        event = queue_publication(
            session, study, PublicationChannel.ups_event, "WATCHER", payload={"event_type": 1}
        )
        session.commit()
        newer = queue_publication(session, study, PublicationChannel.hl7, "ris", supersede=True)
        other_event = queue_publication(
            session, study, PublicationChannel.ups_event, "WATCHER", payload={"event_type": 1}
        )
        elsewhere = queue_publication(session, study, PublicationChannel.hl7, "lab")
        session.commit()
        states = {
            row.id: (row.channel, row.state)
            for row in session.exec(select(Publication).where(Publication.study_id == study))
        }
    assert states[old.id] == (PublicationChannel.hl7, PublicationState.superseded)
    assert states[newer.id] == (PublicationChannel.hl7, PublicationState.pending)
    # UPS events each report their own change; another recipient is another row.
    assert states[event.id][1] is PublicationState.pending
    assert states[other_event.id][1] is PublicationState.pending
    assert states[elsewhere.id][1] is PublicationState.pending
    assert isinstance(states[event.id][0], PublicationChannel)  # an enum read back, not a str


# --- recording failures ----------------------------------------------------------------------


def test_a_failed_delivery_is_rescheduled_then_dead_lettered(database: Database) -> None:
    backoff = Backoff(initial_s=10.0, max_s=15.0, max_attempts=3)
    with database.session() as session:
        job = new_job(session, "1.2.3")
        assert job.id is not None
        delivery = queue_delivery(session, job.id, "1.2.3.4", "PACS@127.0.0.1:104")
        session.commit()
        delays = []
        for attempt in (1, 2):
            before = utcnow()
            assert record_failure(delivery, f"refused {attempt}", backoff) is False
            delays.append((delivery.next_attempt_at - before).total_seconds())
            assert delivery.state is DeliveryState.pending and delivery.attempts == attempt
        assert record_failure(delivery, "refused 3", backoff) is True
        session.add(delivery)
        session.commit()
        session.refresh(delivery)
    assert [round(d) for d in delays] == [10, 15]  # doubled, then held at the ceiling
    assert delivery.state is DeliveryState.failed and delivery.attempts == 3
    assert delivery.last_error == "refused 3"


def test_a_failed_publication_is_dead_lettered_in_its_own_state(database: Database) -> None:
    backoff = Backoff(initial_s=1.0, max_attempts=1)
    with database.session() as session:
        job = new_job(session, "1.2.3")
        row = queue_publication(session, job.study_id, PublicationChannel.webhook, "hook")
        session.commit()
        assert record_failure(row, "HTTP 500", backoff) is True
        session.add(row)
        session.commit()
        session.refresh(row)
    assert row.state is PublicationState.failed and row.attempts == 1
    assert row.last_error == "HTTP 500"
