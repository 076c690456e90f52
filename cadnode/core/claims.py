"""Claims: which worker does a row's work now, and until when.

A compare-and-set transition keeps a job from moving twice, but not the work before it (an
engine call, an SR written, a C-STORE sent) from being done twice by two processes or nodes
reading the same row. So a stage first claims the rows it will work on: `claimed_by` (the
worker: "<node name>/<pid>") and `lease_until` on Job, Delivery and Publication. A row is
free when unclaimed or when its lease ran out; a worker may claim again what it holds.

One function claims on both databases: on PostgreSQL the rows are chosen with `SELECT ...
FOR UPDATE SKIP LOCKED` and claimed in the same statement, so two workers never wait on,
nor take, each other's rows; on SQLite the same UPDATE runs under the database's one
writer lock, which makes choosing and claiming one step.

Each process keeps its leases alive from one thread (every lease/3), which also writes the
process's heartbeat (NodeHeartbeat). A lease not renewed in time is free to another worker:
a killed process's or node's work is taken over after at most one lease. The work's end is
committed only while its worker still holds the claim (`transition`, `settle`), which also
ends the claim; a worker whose lease was taken over finds it lost and commits nothing.
Node clocks must agree (NTP): a lease's end is written by the claiming node's clock.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from sqlalchemy import ColumnElement, delete, inspect, or_, update
from sqlmodel import Session, col, select

from cadnode.core.audit import aware
from cadnode.core.config import NodeSettings
from cadnode.core.db import (
    Database,
    Delivery,
    Job,
    JobState,
    NodeHeartbeat,
    Publication,
    utcnow,
)

log = structlog.get_logger("cadnode.core.claims")

Row = TypeVar("Row", Job, Delivery, Publication)
CLAIMED: tuple[type[Job] | type[Delivery] | type[Publication], ...] = (Job, Delivery, Publication)


def node_name(settings: NodeSettings) -> str:
    return settings.name or socket.gethostname()


class Worker:
    """This process as a claimer of work: its identity, its leases, its heartbeat."""

    def __init__(self, database: Database, settings: NodeSettings, role: str = "node") -> None:
        self.database = database
        self.settings = settings
        self.node = node_name(settings)
        self.identity = f"{self.node}/{os.getpid()}"
        self.role = role
        self.lease = dt.timedelta(seconds=settings.lease_s)
        self.started_at = utcnow()
        self.dicom_port: int | None = None
        self.associations: Callable[[], int] = lambda: 0  # open on this process now
        self._held: dict[type[Any], set[int]] = {table: set() for table in CLAIMED}
        self._guard = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- claiming ----------------------------------------------------------------------------

    def claim(
        self,
        session: Session,
        table: type[Row],
        *conditions: ColumnElement[bool] | bool,
        order_by: Sequence[Any] = (),
        limit: int | None = None,
    ) -> list[Row]:
        """Claim the rows of `table` meeting `conditions` that are free (or already this
        worker's), at most `limit`, in `order_by` (then id) order; they are returned fresh.
        Ends the session's transaction first (its snapshot must not predate the claim)."""
        session.commit()
        now = utcnow()
        ident = col(table.id)
        free = or_(
            col(table.claimed_by).is_(None),
            col(table.lease_until) < now,
            col(table.claimed_by) == self.identity,
        )
        chosen = select(ident).where(*conditions, free).order_by(*order_by, ident).limit(limit)
        if _dialect(session) == "postgresql":  # skip rows another worker is claiming now
            chosen = chosen.with_for_update(skip_locked=True)
        claimed = session.execute(
            update(table)
            .where(ident.in_(chosen.scalar_subquery()))
            .values(claimed_by=self.identity, lease_until=now + self.lease)
            .returning(ident)
        )
        ids = set(claimed.scalars())
        session.commit()
        if not ids:
            return []
        with self._guard:
            self._held[table] |= ids
        fresh = select(table).where(ident.in_(ids)).order_by(*order_by, ident)
        return list(session.exec(fresh.execution_options(populate_existing=True)))

    def holds(self, table: type[Any], row_id: int | None) -> bool:
        """Whether this worker still holds the claim (False once renewal found it taken)."""
        with self._guard:
            return row_id in self._held[table]

    def release(
        self,
        session: Session,
        table: type[Any],
        ids: Sequence[int | None],
        *conditions: ColumnElement[bool],
    ) -> None:
        """Give up claims on rows whose work this worker will not do now (free at once).
        `conditions`: only where they still hold (a job still in the releasing stage's state:
        another stage of this process may hold it in the next)."""
        wanted = [i for i in ids if i is not None]
        if not wanted:
            return
        released = session.execute(
            update(table)
            .where(col(table.id).in_(wanted), col(table.claimed_by) == self.identity, *conditions)
            .values(claimed_by=None, lease_until=None)
            .returning(col(table.id))
        )
        freed = list(released.scalars())
        session.commit()
        self.forget(table, freed)

    def transition(
        self, session: Session, job: Job, to: JobState, *, expect: JobState, **changes: Any
    ) -> bool:
        """`Database.transition`, only while this worker still holds the job's claim."""
        self.forget(Job, [job.id])  # first: once moved, the next stage here may claim it
        moved = self.database.transition(
            session, job, to, expect=expect, holder=self.identity, **changes
        )
        if not moved:
            log.warning("claim.transition_refused", job=job.id, to=to.value, worker=self.identity)
        return moved

    def settle(self, session: Session, row: Delivery | Publication) -> bool:
        """Commit the changes made to `row` (record_sent, record_failure...) and end its claim,
        only while this worker still holds it; else drop them. Whether they were committed."""
        table = type(row)
        changes = {
            attribute.key: attribute.value
            for attribute in inspect(row).attrs
            if attribute.history.has_changes()
        }
        session.expire(row, list(changes))  # written below, where the claim still holds
        self.forget(table, [row.id])
        moved = session.execute(
            update(table)
            .where(col(table.id) == row.id, col(table.claimed_by) == self.identity)
            .values(**changes, claimed_by=None, lease_until=None)
        )
        session.commit()
        session.refresh(row)
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            log.warning("claim.lost", table=table.__tablename__, row=row.id, worker=self.identity)
            return False
        return True

    def forget(self, table: type[Any], ids: Sequence[int | None]) -> None:
        """Stop renewing claims the caller ended itself (in a commit of its own)."""
        with self._guard:
            self._held[table].difference_update(ids)

    @property
    def leases(self) -> int:
        with self._guard:
            return sum(len(ids) for ids in self._held.values())

    # --- the renewer and heartbeat -----------------------------------------------------------

    def start(self, *, fresh_node: bool = False) -> None:
        """Start renewing leases and beating (once): every process that shares its database
        with others does (the node, its workers and receivers); a stage used alone, whose
        claims no one else wants, needs not. `fresh_node`: this is the node's main
        process starting, so claims by the node's earlier processes are over: freed now
        rather than after their leases (node names must be unique among the nodes)."""
        if fresh_node:
            self._free_earlier_lives()
        with self._guard:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="claims-renewer", daemon=True)
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing; free what is still held and say this process is gone."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        with self.database.session() as session:
            for table in CLAIMED:
                with self._guard:
                    held = list(self._held[table])
                self.release(session, table, held)
            session.execute(delete(NodeHeartbeat).where(col(NodeHeartbeat.worker) == self.identity))
            session.commit()

    def _run(self) -> None:
        every = min(self.settings.heartbeat_s, self.settings.lease_s / 3)
        while not self._stopping.wait(every):
            try:
                self.renew()
                self.beat()
            except Exception:  # the database away for a moment: try again next tick
                log.exception("claims.renew_failed", worker=self.identity)

    def renew(self) -> None:
        """Extend every lease this process holds; one no longer ours is dropped (lost)."""
        until = utcnow() + self.lease
        with self.database.session() as session:
            for table in CLAIMED:
                with self._guard:
                    held = set(self._held[table])
                if not held:
                    continue
                renewed = session.execute(
                    update(table)
                    .where(col(table.id).in_(held), col(table.claimed_by) == self.identity)
                    .values(lease_until=until)
                    .returning(col(table.id))
                )
                kept = set(renewed.scalars())
                session.commit()
                with self._guard:  # not those whose end was committed meanwhile (forgotten)
                    lost = (held - kept) & self._held[table]
                if lost:
                    self.forget(table, list(lost))
                    log.warning(
                        "claims.lost",
                        table=table.__tablename__,
                        rows=len(lost),
                        worker=self.identity,
                    )

    def beat(self) -> None:
        with self.database.session() as session:
            session.merge(
                NodeHeartbeat(
                    worker=self.identity,
                    node=self.node,
                    pid=os.getpid(),
                    role=self.role,
                    started_at=self.started_at,
                    last_seen=utcnow(),
                    dicom_port=self.dicom_port,
                    associations=self.associations(),
                    leases=self.leases,
                )
            )
            session.commit()

    def _free_earlier_lives(self) -> None:
        freed = free_claims(self.database, self.node, but=self.identity)
        if freed:
            log.info("claims.freed_earlier", node=self.node, rows=freed)


def free_claims(database: Database, node: str, *, pid: int | None = None, but: str = "") -> int:
    """Free the claims of the node's processes that are gone, and forget their heartbeats:
    the one with `pid`, or every one but `but`. Only for processes known dead (a node's
    earlier life, a worker its supervisor saw exit): their work is taken over now rather than
    when their leases run out. Returns how many rows were freed."""
    freed = 0
    with database.session() as session:
        for table in CLAIMED:
            whose = col(table.claimed_by)
            chosen = (
                whose == f"{node}/{pid}"
                if pid is not None
                else whose.startswith(f"{node}/", autoescape=True) & (whose != but)
            )
            moved = session.execute(
                update(table).where(chosen).values(claimed_by=None, lease_until=None)
            )
            freed += int(moved.rowcount)  # type: ignore[attr-defined]
        beats = col(NodeHeartbeat.worker)
        session.execute(
            delete(NodeHeartbeat).where(
                beats == f"{node}/{pid}"
                if pid is not None
                else (col(NodeHeartbeat.node) == node) & (beats != but)
            )
        )
        session.commit()
    return freed


def _dialect(session: Session) -> str:
    bind = session.get_bind()
    return bind.dialect.name


_workers: weakref.WeakKeyDictionary[Database, Worker] = weakref.WeakKeyDictionary()
_workers_guard = threading.Lock()


def worker_for(
    database: Database, settings: NodeSettings | None = None, role: str = "node"
) -> Worker:
    """This process's one Worker for `database`: made by the first call (the daemon's, with
    the node's settings; a stage made without one gets the defaults)."""
    with _workers_guard:
        worker = _workers.get(database)
        if worker is None:
            worker = _workers[database] = Worker(database, settings or NodeSettings(), role)
        return worker


# A process not heard from for this many leases is shown as gone: its leases have run out.
GONE_AFTER_LEASES = 3


@dataclass(frozen=True)
class ProcessSeen:
    """One process of a node as its last heartbeat said, and whether it has gone quiet."""

    beat: NodeHeartbeat
    gone: bool
    seen_s_ago: float


def processes(session: Session, settings: NodeSettings) -> list[ProcessSeen]:
    """Every process of every node sharing the database, by node, main process first."""
    now = utcnow()
    quiet = GONE_AFTER_LEASES * settings.lease_s
    beats = session.exec(
        select(NodeHeartbeat).order_by(col(NodeHeartbeat.node), col(NodeHeartbeat.started_at))
    ).all()
    seen = []
    for beat in beats:
        ago = (now - aware(beat.last_seen)).total_seconds()
        seen.append(ProcessSeen(beat=beat, gone=ago > quiet, seen_s_ago=ago))
    return seen


def describe(process: ProcessSeen) -> str:
    """One line for `cadnode status`."""
    beat = process.beat
    if process.gone:
        return f"{beat.worker:<28} {beat.role:<8} GONE (last seen {process.seen_s_ago:.0f} s ago)"
    port = f"port {beat.dicom_port}" if beat.dicom_port else "no port"
    return (
        f"{beat.worker:<28} {beat.role:<8} seen {process.seen_s_ago:.0f} s ago, {port}, "
        f"{beat.associations} associations, {beat.leases} leases"
    )
