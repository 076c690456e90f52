"""The housekeeping stage: every `retention.check_every_s`, a pass removes what the policy
allows (cadnode.retain.policy), oldest first, so that rows and files agree after a kill at any
moment (cadnode.retain.removal).

A pass, in order: finish the journal left by a pass a kill cut short; each kind by its age
(images, answers, results, then the rows of whole studies, then audit events); then, if the
data dir's filesystem is above `high_water_percent`, the oldest deletable files whatever
their age (images, then answers, then results) until it is below `low_water_percent`. A pass
works at most a few seconds per turn of the conveyor and goes on at the next, so the node
stops promptly; it ends with one `retention.pass` event counting what went.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import delete, func
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session, col, select

from cadnode.core.config import RetentionSettings, StorageSettings
from cadnode.core.db import (
    Alert,
    AuditEvent,
    AuditKind,
    AuditOutcome,
    CompletionSignal,
    Database,
    PerformedProcedureStep,
    Pin,
    utcnow,
)
from cadnode.core.locks import SPOOL_INSTANCE_LOCKS, keyed_locks, named_lock
from cadnode.retain.policy import (
    DISK_KINDS,
    STUDY_KINDS,
    Candidate,
    Kind,
    Reason,
    deletable,
    max_age,
)
from cadnode.retain.removal import Journal, Plan, add_to_tally, counted, mark, plan

log = structlog.get_logger("cadnode.retain")

# Tests: the path of a file to write once a removal's first commit is made, after which the
# stage stops for good (a test then kills the node between the two commits).
HALT_AFTER_MARK = "CADNODE_TEST_RETAIN_HALT_AFTER_MARK"

TURN_S = 5.0  # work per conveyor turn; the rest of the pass follows at once
STUDIES_PER_REMOVAL = 20  # one removal's two commits cover this many studies at most,
OBJECTS_PER_REMOVAL = 2000  # and no more objects than this past its first study: its first
# commit holds the write lock (receive waits) about 0.2 s for 2,000 files on the 2-core box
STUDIES_PER_DISK_REMOVAL = 5  # smaller under disk pressure: stop close to the low-water mark
AUDIT_EVENTS_PER_REMOVAL = 5000


@dataclass(frozen=True)
class DiskUse:
    """The data dir's filesystem, as `df` counts it (blocks reserved for root left out)."""

    used: int
    available: int

    @property
    def percent(self) -> float:
        whole = self.used + self.available
        return 100.0 * self.used / whole if whole else 0.0

    def above(self, percent: float) -> int:
        """Bytes to free to come down to `percent`."""
        return max(0, int(self.used - percent / 100.0 * (self.used + self.available)))


def measure_disk(folder: Path) -> DiskUse:
    usage = shutil.disk_usage(folder)  # free: what an unprivileged process may still use
    return DiskUse(used=usage.used, available=usage.free)


DiskGauge = Callable[[Path], DiskUse]
Clock = Callable[[], dt.datetime]


class Housekeeper:
    name = "retain"

    def __init__(
        self,
        database: Database,
        storage: StorageSettings,
        settings: RetentionSettings,
        *,
        disk: DiskGauge = measure_disk,
        clock: Clock = utcnow,
        turn_s: float = TURN_S,
    ) -> None:
        self.database = database
        self.storage = storage
        self.settings = settings
        self.disk = disk
        self.clock = clock
        self.turn_s = turn_s
        self.journal = Journal(database, storage, keyed_locks(database, SPOOL_INSTANCE_LOCKS))
        self._halt = os.environ.get(HALT_AFTER_MARK)
        self._next_pass = 0.0  # time.monotonic() of the next pass
        self._pass: _Pass | None = None

    def recover(self) -> int:
        """Finish removals a kill cut short; run at start, before the spool is reconciled."""
        finished = self.journal.finish()
        if finished:
            log.info("retention.recovered", files=finished)
        return finished

    def advance(self) -> float | None:
        now = time.monotonic()
        if now < self._next_pass:
            return self._next_pass - now
        # One process among every node's at a time: what one removes, another must not.
        with named_lock(self.database, "retention").if_free() as mine:
            if not mine:
                return self.settings.check_every_s  # another node's turn
            if self._pass is None:
                self._pass = _Pass(disk_before=self.disk(self.storage.data_dir).percent)
                self.journal.retry_stuck()
            if not self._work(self._pass, deadline=now + self.turn_s):
                return 0.0  # more to do: on the conveyor's next turn
        self._log(self._pass)
        self._pass = None
        self._next_pass = time.monotonic() + self.settings.check_every_s
        return self.settings.check_every_s

    def run_pass(self) -> Counter[str]:
        """One whole pass at once, as the stage makes it over its turns (tests); its counts."""
        self._pass = _Pass(disk_before=self.disk(self.storage.data_dir).percent)
        self.journal.retry_stuck()
        while not self._work(self._pass, deadline=time.monotonic() + self.turn_s):
            pass
        done, self._pass = self._pass, None
        self._log(done)
        return done.counts

    def _work(self, current: _Pass, deadline: float) -> bool:
        """Go on with the pass until `deadline`; True once it is over."""
        self.journal.finish()
        for kind in STUDY_KINDS:
            age = max_age(self.settings, kind)
            if age is not None and not self._by_age(current, kind, age, deadline):
                return False
        if self.settings.audit is not None and not self._audit(current, deadline):
            return False
        if self.settings.jobs is not None:
            self._loose_rows(self.clock() - self.settings.jobs)
        return self._relieve_disk(current, deadline)

    def _by_age(self, current: _Pass, kind: Kind, age: dt.timedelta, deadline: float) -> bool:
        cutoff = self.clock() - age
        while time.monotonic() < deadline:
            with self.database.session() as session:
                chosen = deletable(
                    session,
                    kind,
                    older_than=cutoff,
                    limit=STUDIES_PER_REMOVAL,
                    skip=sorted(current.skip),
                )
            if not chosen:
                return True
            self._remove(current, kind, Reason.age, chosen, cutoff)
        return False

    def _relieve_disk(self, current: _Pass, deadline: float) -> bool:
        settings = self.settings
        low = settings.low_water_percent
        use = self.disk(self.storage.data_dir)
        if use.percent <= settings.high_water_percent and not current.relieving:
            return True
        current.relieving = True
        for kind in DISK_KINDS:
            while (needed := self.disk(self.storage.data_dir).above(low)) > 0:
                if time.monotonic() >= deadline:
                    return False
                chosen = self._oldest_freeing(kind, needed, current.skip)
                if not chosen:
                    break
                self._remove(current, kind, Reason.disk, chosen, None)
        after = self.disk(self.storage.data_dir).percent
        if after > settings.low_water_percent:
            log.warning(
                "retention.disk_still_high",
                used_percent=round(after, 1),
                low_water_percent=settings.low_water_percent,
                reason="nothing more may be removed (unfinished, unsent or pinned)",
            )
        return True

    def _oldest_freeing(self, kind: Kind, needed: int, skip: set[int]) -> list[Candidate]:
        """The oldest studies whose `kind` may go, as few as free `needed` bytes (up to a
        removal's worth: the disk is measured again after each)."""
        with self.database.session() as session:
            found = deletable(
                session, kind, older_than=None, limit=STUDIES_PER_DISK_REMOVAL, skip=sorted(skip)
            )
            made = plan(session, self.storage, kind, Reason.disk, found)
        chosen: list[Candidate] = []
        for study in found:
            chosen.append(study)
            needed -= sum(a.bytes for a in made.removed.get(study.study_uid, {}).values())
            if needed <= 0:
                break
        return chosen

    def _remove(
        self,
        current: _Pass,
        kind: Kind,
        reason: Reason,
        chosen: list[Candidate],
        cutoff: dt.datetime | None,
    ) -> None:
        """One removal: rows and journal in one commit, then the files, then the journal."""
        with self.database.session() as session:
            made = plan(session, self.storage, kind, reason, chosen)
            within = _within(made, OBJECTS_PER_REMOVAL)
            if len(within) < len(chosen):
                chosen = within
                made = plan(session, self.storage, kind, reason, chosen)
        with self.database.session() as session:
            _take_write_lock(session)
            ids = [study.study_id for study in chosen]
            confirmed = deletable(session, kind, older_than=cutoff, limit=None, among=ids)
            current.skip.update(set(ids) - {study.study_id for study in confirmed})
            if not confirmed:
                session.rollback()
                return
            if len(confirmed) < len(chosen):  # something changed since: plan those again
                made = plan(session, self.storage, kind, reason, confirmed)
            try:
                mark(session, made, self.clock())
                session.commit()
            except SQLAlchemyError as error:  # a row this code does not know refers to them
                session.rollback()
                current.skip.update(ids)
                log.error("retention.failed", kind=kind.value, error=str(error).splitlines()[0])
                return
        self._halt_if_asked()
        self.journal.finish()
        current.add(made)

    def _audit(self, current: _Pass, deadline: float) -> bool:
        """Audit events older than their age, except those naming a pinned study."""
        assert self.settings.audit is not None
        cutoff = self.clock() - self.settings.audit
        while time.monotonic() < deadline:
            with self.database.session() as session:
                _take_write_lock(session)
                ids = list(session.exec(old_audit_events(cutoff, AUDIT_EVENTS_PER_REMOVAL)))
                if not ids:
                    session.rollback()
                    return True
                session.execute(delete(AuditEvent).where(col(AuditEvent.id).in_(ids)))
                add_to_tally(session, Kind.audit, Reason.age, len(ids), 0)
                session.add(_audit_removed(len(ids), cutoff, self.clock()))
                session.commit()
            current.counts[f"{Reason.age.value}_{Kind.audit.value}_objects"] += len(ids)
        return False

    def _loose_rows(self, cutoff: dt.datetime) -> None:
        """Rows not tied to a study row, by age: modalities' MPPS and completion signals, and
        alerts that have ended (a watchdog condition still going is kept, however old)."""
        with self.database.session() as session:
            for statement in (
                delete(PerformedProcedureStep).where(
                    col(PerformedProcedureStep.updated_at) < cutoff
                ),
                delete(CompletionSignal).where(col(CompletionSignal.at) < cutoff),
                delete(Alert).where(col(Alert.cleared_at) < cutoff),
            ):
                session.execute(statement)
            session.commit()

    def _halt_if_asked(self) -> None:
        if self._halt:
            Path(self._halt).write_text("marked\n")
            log.warning("retention.halted", reason=f"{HALT_AFTER_MARK} is set (tests only)")
            threading.Event().wait()  # for good: the test kills the node now

    def _log(self, done: _Pass) -> None:
        log.info(
            "retention.pass",
            seconds=round(time.monotonic() - done.started, 3),
            disk_used_percent_before=round(done.disk_before, 1),
            disk_used_percent_after=round(self.disk(self.storage.data_dir).percent, 1),
            skipped_studies=len(done.skip),
            **dict(sorted(done.counts.items())),
        )


@dataclass
class _Pass:
    """One pass, over as many conveyor turns as it takes."""

    disk_before: float  # percent used when it began
    started: float = field(default_factory=time.monotonic)
    relieving: bool = False  # above the high-water mark at some point of this pass
    skip: set[int] = field(default_factory=set)  # studies a removal failed on: not again
    counts: Counter[str] = field(default_factory=Counter)  # for the pass's log event

    def add(self, made: Plan) -> None:
        for key, value in counted(made).items():
            self.counts[f"{made.reason.value}_{key}"] += value


def _within(made: Plan, objects: int) -> list[Candidate]:
    """The plan's first studies, as many as come to `objects` (at least one)."""
    chosen: list[Candidate] = []
    for study in made.studies:
        amounts = made.removed.get(study.study_uid, {}).values()
        objects -= sum(amount.objects for amount in amounts)
        if chosen and objects < 0:
            break
        chosen.append(study)
    return chosen


def old_audit_events(cutoff: dt.datetime, limit: int | None) -> Any:
    """Ids of audit events older than `cutoff`, except those naming a pinned study."""
    named = func.coalesce(col(AuditEvent.details)["study_uid"].as_string(), "")
    statement = (
        select(AuditEvent.id)
        .where(col(AuditEvent.at) < cutoff, named.not_in(select(Pin.study_uid)))
        .order_by(col(AuditEvent.id))
    )
    return statement.limit(limit) if limit is not None else statement


def _audit_removed(count: int, cutoff: dt.datetime, at: dt.datetime) -> AuditEvent:
    return AuditEvent(
        at=at,
        kind=AuditKind.retention_removed,
        actor="node",
        outcome=AuditOutcome.removed,
        details={
            "kind": Kind.audit.value,
            "reason": Reason.age.value,
            "events": count,
            "older_than": cutoff.isoformat(),
        },
    )


# PostgreSQL: the tables whose rows decide what may go, locked as SQLite's write lock locks
# them all (SHARE ROW EXCLUSIVE: writers wait, and so does another node's pass).
_DECIDING_TABLES = (
    "pin, study, job, instance, result, resultobject, delivery, studypriority, publication, "
    "auditevent"
)


# PostgreSQL: how long taking the tables' locks may wait before letting go and trying again.
# Under deadlock_timeout (1 s unless the server sets it lower), so that a writer holding one
# table and waiting for another that this has taken never finds a cycle to be aborted for:
# this lets go first, the writer goes on, and retention tries again after a pause.
_LOCK_WAIT_MS = 300
_LOCK_TRIES = 40


def _take_write_lock(session: Session) -> None:
    """Begin the transaction with the database's write lock (SQLite's BEGIN IMMEDIATE): what
    is checked in it cannot change before it commits."""
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        return
    lock = f"LOCK TABLE {_DECIDING_TABLES} IN SHARE ROW EXCLUSIVE MODE"
    for attempt in range(_LOCK_TRIES):
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {_LOCK_WAIT_MS}")
        try:
            connection.exec_driver_sql(lock)
        except OperationalError:  # timed out: the writers in the way finish first
            session.rollback()
            time.sleep(random.uniform(0.05, 0.05 * 2 ** min(attempt, 4)))
            connection = session.connection()
            continue
        connection.exec_driver_sql("SET LOCAL statement_timeout TO DEFAULT")
        return
    connection.exec_driver_sql(lock)  # the writers never paused: wait for them, as before
