from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from sqlmodel import select

from cadnode.core.config import Destination, DispatchSettings
from cadnode.core.db import (
    Database,
    Delivery,
    DeliveryState,
    FailureKind,
    Job,
    JobState,
    ResultObject,
    utcnow,
)
from cadnode.deliver.dispatch import Dispatcher
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import free_port
from tests.rows import new_job


def at(port: int, ae_title: str = "ORTHANC", **options: bool) -> dict[str, Destination]:
    """One configured destination, named "pacs", on loopback `port`."""
    return {"pacs": Destination(ae_title=ae_title, host="127.0.0.1", port=port, **options)}


def queue_one(database: Database, results: Path, destination: str = "pacs") -> int:
    """A result of an encoded job, queued for the destination named `destination`."""
    ds = write_chest_radiograph(results / "obj.dcm", seed=5)
    with database.session() as session:
        job = new_job(session, "1.2.3", state=JobState.encoded)
        assert job.id is not None
        session.add(
            ResultObject(
                sop_instance_uid=str(ds.SOPInstanceUID),
                job_id=job.id,
                engine="e",
                modality="DX",
                path="obj.dcm",
            )
        )
        session.flush()
        session.add(
            Delivery(object_uid=str(ds.SOPInstanceUID), job_id=job.id, destination=destination)
        )
        session.commit()
        return job.id


def the_delivery(database: Database) -> Delivery:
    with database.session() as session:
        return session.exec(select(Delivery)).one()


def make_due_now(database: Database) -> None:
    with database.session() as session:
        delivery = session.exec(select(Delivery)).one()
        delivery.next_attempt_at = utcnow()
        session.add(delivery)
        session.commit()


def test_back_off_doubles_up_to_its_ceiling(database: Database, tmp_path: Path) -> None:
    queue_one(database, tmp_path)
    settings = DispatchSettings(
        max_attempts=10, backoff_initial_s=10, backoff_max_s=25, timeout_s=2
    )
    nobody = at(free_port(), "NOBODY")
    dispatcher = Dispatcher(database, tmp_path, settings, "CADNODE", destinations=nobody)
    for expected in (10, 20, 25):
        make_due_now(database)
        before = utcnow()
        dispatcher.advance()
        after = utcnow()
        delivery = the_delivery(database)
        # Scheduled from the moment the attempt failed, somewhere between before and after
        # (however long a loaded machine takes to refuse the connection).
        wait = dt.timedelta(seconds=expected)
        assert before + wait <= delivery.next_attempt_at <= after + wait
        assert delivery.state is DeliveryState.pending
        assert "association not established" in (delivery.last_error or "")
    assert the_delivery(database).attempts == 3


def test_unreachable_destination_is_dead_lettered_after_the_limit(
    database: Database, tmp_path: Path
) -> None:
    job_id = queue_one(database, tmp_path)
    settings = DispatchSettings(
        max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.01, timeout_s=2
    )
    nobody = at(free_port(), "NOBODY")
    dispatcher = Dispatcher(database, tmp_path, settings, "CADNODE", destinations=nobody)
    dispatcher.advance()
    time.sleep(0.05)
    assert dispatcher.advance() is None  # nothing left to retry
    delivery = the_delivery(database)
    assert delivery.state is DeliveryState.failed and delivery.attempts == 2
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.failed
        assert job.failure is FailureKind.dead_letter and "dead letter" in (job.reason or "")
