"""The admin's outbox actions (cadnode/deliver/outbox_admin.py) and Storage Commitment
answers (cadnode/deliver/commitment.py), on the dispatcher in this process with a real Orthanc
as the PACS."""

from __future__ import annotations

import time
from pathlib import Path

from sqlmodel import select

from cadnode.core.config import DispatchSettings
from cadnode.core.db import (
    Database,
    Delivery,
    DeliveryState,
    FailureKind,
    Job,
    JobState,
    ResultObject,
)
from cadnode.deliver.commitment import CommitmentScp
from cadnode.deliver.dispatch import Dispatcher
from cadnode.deliver.outbox_admin import commitment_of, delivery_rows, discard, retry
from tests.peers import free_port, run_orthanc
from tests.rows import job_of
from tests.test_dispatch import at, queue_one, the_delivery

FAST = DispatchSettings(max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.01, timeout_s=5)


def dead_letter(database: Database, folder: Path, port: int) -> tuple[Dispatcher, int]:
    """A result whose destination (ORTHANC on `port`) never answered, dead-lettered after
    FAST's two attempts."""
    job_id = queue_one(database, folder)
    dispatcher = Dispatcher(database, folder, FAST, "CADNODE", destinations=at(port))
    dispatcher.advance()
    time.sleep(0.05)
    dispatcher.advance()
    assert the_delivery(database).state is DeliveryState.failed
    job = job_of(database, job_id)
    assert job.state is JobState.failed and job.failure is FailureKind.dead_letter
    return dispatcher, job_id


def test_a_retried_dead_letter_is_sent_and_its_job_delivered(
    database: Database, tmp_path: Path
) -> None:
    port = free_port()
    dispatcher, job_id = dead_letter(database, tmp_path, port)
    delivery_id = the_delivery(database).id
    assert delivery_id is not None

    [outcome] = retry(database, [delivery_id], "cli:tester")
    assert outcome.done, outcome.note
    delivery = the_delivery(database)
    assert delivery.state is DeliveryState.pending and delivery.attempts == 0
    job = job_of(database, job_id)
    assert job.state is JobState.encoded and job.reason is None

    with run_orthanc(tmp_path / "orthanc", dicom_port=port) as pacs:
        dispatcher.advance()
        assert len(pacs.instances()) == 1
    assert the_delivery(database).state is DeliveryState.sent
    assert job_of(database, job_id).state is JobState.delivered
    # Sent is final: neither action applies to it any more.
    [again] = retry(database, [delivery_id], "cli:tester")
    assert not again.done and "only failed" in again.note
    [late] = discard(database, [delivery_id], "cli:tester")
    assert not late.done and "only pending or failed" in late.note


def test_a_discarded_delivery_is_never_sent(database: Database, tmp_path: Path) -> None:
    port = free_port()
    job_id = queue_one(database, tmp_path)
    delivery_id = the_delivery(database).id
    assert delivery_id is not None

    [outcome] = discard(database, [delivery_id], "cli:tester")
    assert outcome.done, outcome.note
    with run_orthanc(tmp_path / "orthanc", dicom_port=port) as pacs:
        Dispatcher(database, tmp_path, FAST, "CADNODE", destinations=at(port)).advance()
        assert pacs.instances() == []
    delivery = the_delivery(database)
    assert delivery.state is DeliveryState.discarded and delivery.attempts == 0
    assert delivery.discarded_by == "cli:tester" and delivery.discarded_at is not None
    job = job_of(database, job_id)
    assert job.state is JobState.delivered and "discarded" in (job.reason or "")
    [row] = delivery_rows(database, DeliveryState.discarded)
    assert row["id"] == delivery_id and row["discarded_by"] == "cli:tester"


def test_retry_all_failed_and_unknown_ids(database: Database, tmp_path: Path) -> None:
    dead_letter(database, tmp_path, free_port())
    [missing] = retry(database, [999], "cli:tester")
    assert not missing.done and missing.note == "no such delivery"
    [outcome] = retry(database, [], "cli:tester", all_failed=True)
    assert outcome.done
    assert retry(database, [], "cli:tester", all_failed=True) == []  # nothing failed now
    with database.session() as session:
        job = session.exec(select(Job)).one()
        assert job.state is JobState.encoded and job.failure is None and job.reason is None


def test_a_commitment_report_is_recorded_on_its_transaction(
    database: Database, tmp_path: Path
) -> None:
    queue_one(database, tmp_path)
    with database.session() as session:
        delivery = session.exec(select(Delivery)).one()
        delivery.state = DeliveryState.sent
        delivery.commitment_transaction_uid = "2.25.1"
        session.add(delivery)
        session.commit()
        uid = session.exec(select(ResultObject.sop_instance_uid)).one()

    reports = CommitmentScp(database)
    assert reports.record("2.25.2", [uid], {}) == 0  # another transaction's answer
    assert commitment_of(the_delivery(database)) == "-"
    assert reports.record("2.25.1", [], {uid: 0x0112}) == 1
    delivery = the_delivery(database)
    assert commitment_of(delivery) == "failed"
    assert delivery.commitment_failure == "0x0112 no such object instance"
    assert reports.record("2.25.1", [uid], {}) == 1  # a later answer that it is kept
    delivery = the_delivery(database)
    assert commitment_of(delivery) == "committed" and delivery.commitment_failure is None


def test_a_commitment_nobody_answers_is_asked_again_then_failed(
    database: Database, tmp_path: Path
) -> None:
    """Orthanc does not know the node's AE, so it never reports: asked twice, then failed."""
    with run_orthanc(tmp_path / "orthanc") as pacs:
        queue_one(database, tmp_path)
        settings = FAST.model_copy(
            update={"commitment_timeout_s": 0.3, "commitment_max_requests": 2}
        )
        committing = at(pacs.dicom_port, storage_commitment=True)
        dispatcher = Dispatcher(database, tmp_path, settings, "CADNODE", destinations=committing)
        due_in = dispatcher.advance()
        first = the_delivery(database)
        assert first.state is DeliveryState.sent and first.commitment_requests == 1
        assert first.commitment_transaction_uid and due_in is not None and due_in <= 0.3
        time.sleep(0.35)
        dispatcher.advance()
        second = the_delivery(database)
        assert second.commitment_requests == 2
        assert second.commitment_transaction_uid == first.commitment_transaction_uid
        time.sleep(0.35)
        assert dispatcher.advance() is None  # nothing more to ask or send
        assert len(pacs.instances()) == 1  # sent once, for all the asking
    delivery = the_delivery(database)
    assert commitment_of(delivery) == "failed"
    assert delivery.commitment_failure == "no answer to 2 request(s)"
