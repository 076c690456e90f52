"""Several processes writing one PostgreSQL database at once, as receivers, workers and nodes
do: instances stored through the receive path into the same studies, jobs moved on (and
failed, and replayed back) by racing transitions with their answers and deliveries, and
retention taking its table locks between them. No transaction may fail, deadlocks included,
and every tally must come out as counting the rows gives."""

from __future__ import annotations

import multiprocessing
import random
import traceback
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from cadnode.core import audit
from cadnode.core.db import (
    AuditOutcome,
    Database,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    PriorityClass,
    Result,
)
from cadnode.core.tallies import compact
from cadnode.infer.answers import dump_answer
from cadnode.ingest.spool import Arrival, Spool
from cadnode.retain.stage import _take_write_lock
from tests.answer_cases import ruleout_answer
from tests.test_metrics_tallies import assert_agree, context_for, counted_whole, scraped

WRITERS, INSTANCES, STUDIES = 4, 60, 12
FORWARD = {
    JobState.received: JobState.complete,
    JobState.complete: JobState.routed,
    JobState.routed: JobState.inferred,
    JobState.inferred: JobState.encoded,
    JobState.encoded: JobState.delivered,
}


def _arrival(writer: int, number: int) -> Arrival:
    study = f"1.2.826.0.1.3680043.10.9.{number % STUDIES}"
    return Arrival(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        sop_instance_uid=f"{study}.{writer}.{number}",
        study_uid=study,
        series_uid=f"{study}.1",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae=f"MOD{number % 3}",
        called_ae="CADNODE",
        peer="127.0.0.1:1",
    )


def _move_one(database: Database, session: Session, job: Job, rng: random.Random) -> None:
    """What a stage does with a job: its rows, then the transition, in one commit; or an
    engine failing it, or an admin's replay of a failed one."""
    if job.state is JobState.failed:
        database.transition(session, job, JobState.routed, expect=JobState.failed)
        return
    if job.state not in FORWARD:
        return
    if job.state is JobState.routed and rng.random() < 0.3:
        database.transition(session, job, JobState.failed, expect=JobState.routed, reason="x")
        return
    if job.state is JobState.routed:
        session.add(
            Result(
                job_id=job.id,  # type: ignore[arg-type]
                engine="cxr-ruleout",
                engine_version="1",
                model_sha256="0" * 64,
                sop_instance_uid=f"{job.id}.{rng.random()}",
                answer=dump_answer(ruleout_answer(rng.random())),
                seconds=round(rng.uniform(0.01, 3.0), 3),
            )
        )
    if job.state is JobState.inferred:
        for destination in ("pacs", "archive"):
            # Racing writers each make their own: the one whose transition loses rolls back.
            uid = f"{job.id}.{rng.getrandbits(32)}"
            session.add(Delivery(object_uid=uid, job_id=job.id, destination=destination))
    if job.state is JobState.encoded:
        for delivery in session.exec(select(Delivery).where(col(Delivery.job_id) == job.id)):
            delivery.state, delivery.attempts = DeliveryState.sent, rng.randint(1, 3)
            session.add(delivery)
    priority = rng.choice(list(PriorityClass))
    database.transition(session, job, FORWARD[job.state], expect=job.state, priority=priority)


def _retain(database: Database) -> None:
    """Retention's write lock, and a removal under it."""
    with database.session() as session:
        _take_write_lock(session)
        doomed = session.exec(
            select(Delivery).where(col(Delivery.state) == DeliveryState.sent).limit(1)
        ).first()
        if doomed is not None:
            session.delete(doomed)
        session.commit()


def _writer(url: str, writer: int, folder: str, failures: multiprocessing.Queue[str]) -> None:
    try:
        rng = random.Random(writer)
        database = Database(url)
        spool = Spool(Path(folder) / str(writer), database, 0)
        for number in range(INSTANCES):
            spool.store(_arrival(writer, number), [b"DICM"])
            with database.session() as session:
                jobs = list(session.exec(select(Job).order_by(col(Job.id))))
                for job in rng.sample(jobs, min(len(jobs), 3)):
                    _move_one(database, session, job, rng)
            if writer == 0 and number % 5 == 0:
                _retain(database)
        spool.close()
        database.engine.dispose()
    except BaseException:
        failures.put(traceback.format_exc())


@pytest.mark.timeout(300)
def test_concurrent_writers_never_fail_and_the_tallies_stay_right(
    postgres_url: str, tmp_path: Path
) -> None:
    database = Database(postgres_url)
    spawn = multiprocessing.get_context("spawn")
    failures: multiprocessing.Queue[str] = spawn.Queue()
    processes = [
        spawn.Process(target=_writer, args=(postgres_url, n, str(tmp_path), failures))
        for n in range(WRITERS)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(240)
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert not found, "\n".join(found)
    assert [process.exitcode for process in processes] == [0] * WRITERS
    for outcome, reason in [("accepted", None)] * 5 + [("rejected", "unknown AE")] * 2:
        details = {"reason": reason} if reason else {}
        audit.record(
            database,
            audit.ASSOCIATION,
            actor="X",
            address="10.0.0.1:1",
            outcome=AuditOutcome(outcome),
            **details,
        )
    context = context_for(database, tmp_path)
    assert_agree(scraped(context), counted_whole(database))
    # Folded into the rows, the changes are gone and the figures the same.
    assert compact(database.engine) > 0
    with database.engine.connect() as connected:
        for table in ("metrictallydelta", "metricbucketdelta"):
            assert connected.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar() == 0
    assert_agree(scraped(context), counted_whole(database))
    database.engine.dispose()
