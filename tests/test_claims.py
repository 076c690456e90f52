"""Claims with leases (cadnode/core/claims.py) and database locks (cadnode/core/locks.py).

On SQLite and on a real PostgreSQL server: two workers racing for the same job (threads with
sessions of their own, and processes) - exactly one gets it; a worker killed while holding a
claim - its job is taken over after the lease and done once; a worker whose lease was taken
cannot commit its transition; two dispatchers on one database sending to DCMTK's storescp
`+uf` (a new file per C-STORE) - each object arrives once; advisory locks exclude across
processes on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import errno
import multiprocessing
import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlmodel import col, select

from cadnode.admin.app import create_app
from cadnode.admin.commands import show_nodes
from cadnode.core.claims import Worker, processes
from cadnode.core.config import Destination, DispatchSettings, NodeSettings
from cadnode.core.db import (
    Database,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    NodeHeartbeat,
    ResultObject,
    utcnow,
)
from cadnode.core.locks import keyed_locks, named_lock
from cadnode.deliver.dispatch import Dispatcher
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.ingest import captured_events, named, storescp
from tests.peers import wait_for
from tests.rows import new_job
from tests.test_admin import log_in, make_context

SPAWN = multiprocessing.get_context("spawn")


def url_of(database: Database) -> str:
    """What another process opens the same database with."""
    return database.url.render_as_string(hide_password=False)


def worker(database: Database, name: str, lease_s: float = 60) -> Worker:
    return Worker(database, NodeSettings(name=name, lease_s=lease_s))


def jobs_in(database: Database, count: int, state: JobState = JobState.complete) -> list[int]:
    with database.session() as session:
        ids = [new_job(session, f"1.2.{n}", state=state).id for n in range(count)]
        session.commit()
    return [i for i in ids if i is not None]


def claim_one(who: Worker, state: JobState = JobState.complete) -> list[Job]:
    with who.database.session() as session:
        return who.claim(session, Job, col(Job.state) == state, limit=1)


def test_two_threads_racing_for_each_job_one_gets_it(database: Database) -> None:
    ids = jobs_in(database, 20)
    workers = [worker(database, "a"), worker(database, "b")]
    got: dict[str, list[int]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def race(who: Worker) -> None:
        for _ in ids:
            start.wait(30)  # both claim at once, every round
            got[who.node] += [job.id for job in claim_one(who) if job.id is not None]
            start.wait(30)
            with database.session() as session:  # the winner moves it on: next round, next job
                for job in session.exec(select(Job).where(col(Job.claimed_by) == who.identity)):
                    who.transition(session, job, JobState.routed, expect=JobState.complete)

    threads = [threading.Thread(target=race, args=(who,)) for who in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(got["a"] + got["b"]) == ids, "each job claimed once, by one of them"
    assert got["a"] and got["b"], "both won some races"


def _claim_and_move(where: str, name: str, ready: Any, go: Any, done: Any) -> None:
    database = Database(where)
    who = worker(database, name)
    ready.set()
    go.wait(60)
    with database.session() as session:
        while claimed := who.claim(session, Job, col(Job.state) == JobState.complete, limit=1):
            if who.transition(session, claimed[0], JobState.routed, expect=JobState.complete):
                done.put(claimed[0].id)
    who.stop()


@pytest.mark.integration  # processes of their own: seconds to start
def test_two_processes_claiming_together_do_each_job_once(database: Database) -> None:
    where = url_of(database)
    ids = jobs_in(database, 40)
    go, done = SPAWN.Event(), SPAWN.Queue()
    readies = [SPAWN.Event() for _ in range(2)]
    processes = [
        SPAWN.Process(target=_claim_and_move, args=(where, name, ready, go, done))
        for name, ready in zip("ab", readies, strict=True)
    ]
    for process in processes:
        process.start()
    for ready in readies:
        assert ready.wait(60)
    go.set()
    moved = [done.get(timeout=60) for _ in ids]
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert Counter(moved) == Counter(ids), "each job moved on once"
    with database.session() as session:
        states = set(session.exec(select(Job.state)))
        assert states == {JobState.routed}
        assert session.exec(select(NodeHeartbeat)).all() == [], "gone when stopped"


def _claim_and_hang(where: str, claimed: Any) -> None:
    database = Database(where)
    who = worker(database, "doomed", lease_s=1)
    who.start()
    claimed.put([job.id for job in claim_one(who)])
    threading.Event().wait(120)  # renewing, until killed


@pytest.mark.integration  # a process of its own: seconds to start
def test_a_killed_workers_job_is_taken_over_after_its_lease_and_done_once(
    database: Database,
) -> None:
    where = url_of(database)
    [job_id] = jobs_in(database, 1)
    claimed = SPAWN.Queue()
    doomed = SPAWN.Process(target=_claim_and_hang, args=(where, claimed))
    doomed.start()
    assert claimed.get(timeout=60) == [job_id]
    survivor = worker(database, "survivor")
    assert claim_one(survivor) == [], "held while its holder renews"
    assert doomed.pid is not None
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(30)
    wait_for(lambda: claim_one(survivor), 30, "the lease to run out")
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert survivor.transition(session, job, JobState.routed, expect=JobState.complete)
        assert job.state is JobState.routed
        assert (job.claimed_by, job.lease_until) == (None, None), "done: the claim is over"
        assert list(job.timeline) == ["routed"], "moved once"


def test_a_worker_whose_lease_was_taken_cannot_commit(database: Database) -> None:
    [job_id] = jobs_in(database, 1)
    slow, quick = worker(database, "slow"), worker(database, "quick")
    assert claim_one(slow)
    with database.session() as session:  # slow stalls past its lease (no renewal meanwhile)
        past = utcnow() - dt.timedelta(seconds=1)
        session.execute(update(Job).where(col(Job.id) == job_id).values(lease_until=past))
        session.commit()
    assert claim_one(quick)
    slow.renew()
    assert not slow.holds(Job, job_id), "renewal finds it lost"
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert not slow.transition(session, job, JobState.routed, expect=JobState.complete)
        assert quick.transition(session, job, JobState.routed, expect=JobState.complete)


def queue_results(database: Database, results: Path, count: int) -> None:
    with database.session() as session:
        job = new_job(session, "1.2.3", state=JobState.encoded)
        assert job.id is not None
        for n in range(count):
            ds = write_chest_radiograph(results / f"{n}.dcm", seed=n)
            uid = str(ds.SOPInstanceUID)
            session.add(
                ResultObject(
                    sop_instance_uid=uid, job_id=job.id, engine="e", modality="DX", path=f"{n}.dcm"
                )
            )
            session.add(Delivery(object_uid=uid, job_id=job.id, destination="pacs"))
        session.commit()


def test_two_dispatchers_on_one_database_send_each_object_once(
    database: Database, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    queue_results(database, results, 24)
    received = tmp_path / "pacs"
    with storescp(received, "+uf") as port:  # a new file per C-STORE: duplicates show
        pacs = {"pacs": Destination(ae_title="STORESCP", host="127.0.0.1", port=port)}
        dispatchers = []
        for name in "ab":
            dispatcher = Dispatcher(
                database, results, DispatchSettings(timeout_s=10), "CADNODE", destinations=pacs
            )
            dispatcher.worker = worker(database, name)  # as two nodes would be
            dispatchers.append(dispatcher)
        start = threading.Barrier(2)

        def dispatch(dispatcher: Dispatcher) -> None:
            start.wait(30)
            dispatcher.advance()

        threads = [threading.Thread(target=dispatch, args=(d,)) for d in dispatchers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        with database.session() as session:
            states = list(session.exec(select(Delivery.state)))
        assert states == [DeliveryState.sent] * 24
    files = list(received.iterdir())
    assert len(files) == 24, "each object stored once: no second C-STORE of any"


def _hold_until_killed(where: str, held: Any) -> None:
    database = Database(where)
    with named_lock(database, "watch"), keyed_locks(database, "spool-instances").hold("1.2.3"):
        held.set()
        threading.Event().wait(120)


def test_database_locks_exclude_across_processes_on_postgresql(postgres_url: str) -> None:
    postgres = postgres_url
    database = Database(postgres)
    held = SPAWN.Event()
    other = SPAWN.Process(target=_hold_until_killed, args=(postgres, held))
    other.start()
    assert held.wait(60)
    locks = keyed_locks(database, "spool-instances")
    with named_lock(database, "watch").if_free() as mine:
        assert not mine, "held by the other process"
    assert locks.marked_elsewhere("1.2.3"), "the key is held by the other process"
    assert not locks.marked_elsewhere("1.2.4"), "another key is not"
    assert other.pid is not None
    os.kill(other.pid, signal.SIGKILL)  # the server drops a dead connection's locks
    other.join(30)

    def free() -> bool:
        with named_lock(database, "watch").if_free() as mine:
            return mine

    wait_for(free, 30, "the killed process's lock to go")
    with locks.hold("1.2.3"):
        assert not locks.marked_elsewhere("1.2.3")
    assert database.file is None and not (Path.cwd() / "locks").exists(), "no lock files"


def _hold_until_told(where: str, held: Any, done: Any) -> None:
    with keyed_locks(Database(where), "spool-instances").hold("1.2.3"):
        held.set()
        done.wait(120)


def test_a_key_held_elsewhere_runs_the_waiters_work_before_it_waits(database: Database) -> None:
    """`hold(key, before_waiting)`: the receiver lets its own deferred instances (and their
    locks) go before it waits for one another thread or process holds, so two associations
    sending each other's instances never wait on each other in a cycle. A free key never
    runs the work."""
    locks = keyed_locks(database, "spool-instances")
    ran: list[str] = []
    with locks.hold("1.2.4", lambda: ran.append("free")):
        pass
    assert ran == []

    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with locks.hold("1.2.3"):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(60)
    with locks.hold("1.2.3", lambda: (ran.append("thread"), release.set())):
        pass
    thread.join(60)
    assert ran == ["thread"]

    process_held, done = SPAWN.Event(), SPAWN.Event()
    other = SPAWN.Process(target=_hold_until_told, args=(url_of(database), process_held, done))
    other.start()
    assert process_held.wait(60)
    with locks.hold("1.2.3", lambda: (ran.append("process"), done.set())):
        pass
    other.join(60)
    assert ran == ["thread", "process"]


def test_a_cycle_the_kernel_reports_between_processes_is_waited_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POSIX locks belong to processes: the kernel may answer a wait EDEADLK for a cycle
    through threads that are not waiting on each other. The wait is tried again (the
    caller's own work let go once more), not failed."""
    from cadnode.core import locks as module

    locks = keyed_locks(Database(tmp_path / "cadnode.db"), "spool-instances")
    real, reported = module.fcntl.lockf, [0]

    def lockf(descriptor: int, command: int, *args: Any) -> Any:
        if command == module.fcntl.LOCK_EX | module.fcntl.LOCK_NB:
            raise BlockingIOError(errno.EAGAIN, "held elsewhere")
        if command == module.fcntl.LOCK_EX and reported[0] < 2:
            reported[0] += 1
            raise OSError(errno.EDEADLK, "Resource deadlock avoided")
        return real(descriptor, command, *args)

    monkeypatch.setattr(module.fcntl, "lockf", lockf)
    ran: list[str] = []
    with captured_events() as events, locks.hold("1.2.5", lambda: ran.append("let go")):
        pass
    assert reported == [2]
    assert ran == ["let go"] * 3  # before the first wait, and before each retry
    assert len(named(events, "locks.cycle_reported")) == 2


def test_each_process_is_listed_with_its_leases_and_a_silent_one_as_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    context = make_context(tmp_path / "var")
    database = context.database
    [job_id] = jobs_in(database, 1)
    live = worker(database, "alpha")
    live.dicom_port, live.associations = 11112, lambda: 2
    assert claim_one(live)
    live.beat()
    silent = worker(database, "beta")
    silent.beat()
    with database.session() as session:  # beta last beat long ago: it died
        long_ago = utcnow() - dt.timedelta(minutes=10)
        session.execute(
            update(NodeHeartbeat)
            .where(col(NodeHeartbeat.node) == "beta")
            .values(last_seen=long_ago)
        )
        session.commit()
        seen = {p.beat.node: p for p in processes(session, NodeSettings())}
    assert not seen["alpha"].gone and seen["beta"].gone
    assert (seen["alpha"].beat.leases, seen["alpha"].beat.associations) == (1, 2)
    show_nodes(context.settings)
    printed = capsys.readouterr().out
    assert f"{live.identity}" in printed and "port 11112, 2 associations, 1 leases" in printed
    assert f"{silent.identity}" in printed and "GONE" in printed
    with TestClient(create_app(context), follow_redirects=False) as client:
        assert log_in(client) == 303
        page = client.get("/queues").text
    assert live.identity in page and silent.identity in page and "GONE" in page
    live.stop()
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.claimed_by is None, "freed when its worker stops"
        assert [p.beat.node for p in processes(session, NodeSettings())] == ["beta"]


def test_a_stage_releasing_never_frees_what_the_next_stage_of_its_process_holds(
    database: Database,
) -> None:
    """Stages of one process claim as one worker: infer's release of a job it just moved on
    must leave encode's claim on it."""
    [job_id] = jobs_in(database, 1, JobState.routed)
    node = worker(database, "one")
    with database.session() as session:
        [job] = node.claim(session, Job, col(Job.state) == JobState.routed)
        assert node.transition(session, job, JobState.inferred, expect=JobState.routed)
        assert node.claim(session, Job, col(Job.state) == JobState.inferred)  # encode's turn
        node.release(session, Job, [job_id], col(Job.state) == JobState.routed)
        assert node.holds(Job, job_id)
        node.renew()
        assert node.holds(Job, job_id), "still renewed"
        assert node.transition(session, job, JobState.encoded, expect=JobState.inferred)
