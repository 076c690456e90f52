"""Removing a study's data so that rows and files agree after a kill at any moment.

One removal is two commits around the file deletions:

1. In one transaction that holds the database's write lock, the studies are checked again
   (cadnode.retain.policy), their rows of the kind are deleted (with serve's query records,
   so C-FIND stops finding them at that commit), each of their files is written to the
   journal (`Removal`), the tallies and one audit event per study are added: committed.
2. The files are deleted and their folders flushed to disk.
3. The journal entries are deleted: committed.

A kill after 1 leaves journal entries; `finish` (run at start, before the spool is
reconciled, and at each pass) deletes their files and then the entries, so a file whose row
is gone is never indexed again by the spool's reconciliation and never served. A received
image that arrives again while its old copy is in the journal keeps its file: the spool's
per-instance lock is held while its row is looked for and the file deleted.

Everything a removal deletes is listed here, so a new table that hangs off a study, a job,
an instance or a result must be added here too.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from cadnode.core.config import StorageSettings
from cadnode.core.db import (
    AuditEvent,
    AuditKind,
    AuditOutcome,
    CompletionSignal,
    Database,
    Delivery,
    Feedback,
    Instance,
    Job,
    Publication,
    QueryRecord,
    Removal,
    RemovedTally,
    Result,
    ResultObject,
    ResultSeries,
    ShadowRun,
    Study,
    StudyPriority,
    UpsSubscription,
    Workitem,
)
from cadnode.core.files import fsync_path
from cadnode.core.locks import Keyed
from cadnode.retain.policy import Candidate, Kind, Reason

log = structlog.get_logger("cadnode.retain")

BATCH = 500  # bound parameters per statement (SQLite allows 999 by default on old builds)


class Folder(StrEnum):
    """Which data folder a journalled file lies in (Removal.folder)."""

    spool = "spool"
    results = "results"
    answers = "answers"


FOLDER_OF_KIND = {Kind.images: Folder.spool, Kind.results: Folder.results}


def folders(storage: StorageSettings) -> dict[Folder, Path]:
    return {
        Folder.spool: storage.spool,
        Folder.results: storage.results,
        Folder.answers: storage.answers,
    }


@dataclass(frozen=True)
class Doomed:
    """A file to delete."""

    folder: Folder
    path: str  # relative to its folder
    size: int


@dataclass
class Amount:
    objects: int = 0
    bytes: int = 0

    def add(self, objects: int, size: int) -> None:
        self.objects += objects
        self.bytes += size


@dataclass
class Plan:
    """What removing one kind of a batch of studies takes away."""

    kind: Kind
    reason: Reason
    studies: list[Candidate]
    files: list[Doomed] = field(default_factory=list)
    # Per study UID and kind: what goes (the rows kind sweeps the other kinds along).
    removed: dict[str, dict[Kind, Amount]] = field(default_factory=dict)

    def count(self, study_uid: str, kind: Kind, objects: int, size: int) -> None:
        if objects:
            self.removed.setdefault(study_uid, {}).setdefault(kind, Amount()).add(objects, size)

    def totals(self) -> dict[Kind, Amount]:
        total: dict[Kind, Amount] = {}
        for kinds in self.removed.values():
            for kind, amount in kinds.items():
                total.setdefault(kind, Amount()).add(amount.objects, amount.bytes)
        return total

    @property
    def bytes(self) -> int:
        return sum(doomed.size for doomed in self.files)


def plan(
    session: Session,
    storage: StorageSettings,
    kind: Kind,
    reason: Reason,
    studies: list[Candidate],
) -> Plan:
    """What removing `kind` of `studies` would take away (reads only)."""
    made = Plan(kind, reason, studies)
    jobs = _jobs_by_study(session, [study.study_id for study in studies])
    places = folders(storage)
    for study in studies:
        job_ids = jobs.get(study.study_id, [])
        swept = (Kind.images, Kind.answers, Kind.results) if kind is Kind.jobs else (kind,)
        for each in swept:
            files = list(_files(session, places, each, study.study_uid, job_ids))
            made.files.extend(files)
            made.count(study.study_uid, each, _rows(session, each, job_ids), _size(files))
        if kind is Kind.jobs:
            made.count(study.study_uid, Kind.jobs, len(job_ids), 0)
    return made


def _jobs_by_study(session: Session, study_ids: list[int]) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for batch in _batches(study_ids):
        for job_id, study_id in session.exec(
            select(Job.id, Job.study_id).where(col(Job.study_id).in_(batch))
        ):
            if job_id is not None:
                found.setdefault(study_id, []).append(job_id)
    return found


def _rows(session: Session, kind: Kind, job_ids: list[int]) -> int:
    job_id = {
        Kind.images: col(Instance.job_id),
        Kind.results: col(ResultObject.job_id),
        Kind.answers: col(Result.job_id),
    }[kind]
    total = 0
    for batch in _batches(job_ids):
        total += session.exec(select(func.count()).where(job_id.in_(batch))).one()
    return total


def _size(files: Iterable[Doomed]) -> int:
    return sum(doomed.size for doomed in files)


def _files(
    session: Session, places: dict[Folder, Path], kind: Kind, study_uid: str, job_ids: list[int]
) -> Iterator[Doomed]:
    for batch in _batches(job_ids):
        if kind is Kind.images:
            rows = session.exec(
                select(Instance.path, Instance.size).where(col(Instance.job_id).in_(batch))
            )
            yield from (Doomed(Folder.spool, path, size) for path, size in rows)
        elif kind is Kind.results:
            paths = session.exec(
                select(ResultObject.path).where(col(ResultObject.job_id).in_(batch))
            )
            yield from (_on_disk(places, Folder.results, path) for path in paths)
    if kind is Kind.answers:
        yield from _answer_files(session, places, study_uid, job_ids)


def _answer_files(
    session: Session, places: dict[Folder, Path], study_uid: str, job_ids: list[int]
) -> Iterator[Doomed]:
    """The masks the answers name, and whatever else lies in the jobs' answer folders (masks
    of an engine call that failed before its answers were recorded)."""
    named: set[str] = set()
    for batch in _batches(job_ids):
        for (answer,) in session.execute(
            select(col(Result.answer)).where(col(Result.job_id).in_(batch))
        ):
            mask = answer.get("mask_file") if isinstance(answer, dict) else None
            if mask:
                named.add(str(mask))
    root = places[Folder.answers]
    for job_id in job_ids:
        folder = root / study_uid / str(job_id)
        for dirpath, _dirs, names in os.walk(folder):
            named.update(str(Path(dirpath, name).relative_to(root)) for name in names)
    yield from (_on_disk(places, Folder.answers, path) for path in sorted(named))


def _on_disk(places: dict[Folder, Path], folder: Folder, path: str) -> Doomed:
    try:
        size = (places[folder] / path).stat().st_size
    except OSError:  # already gone: its row still goes
        size = 0
    return Doomed(folder, path, size)


def mark(session: Session, made: Plan, at: dt.datetime) -> None:
    """Step 1: rows deleted, files journalled, tallies and audit added, in the caller's
    transaction (the caller commits)."""
    job_ids = [j for ids in _jobs_by_study(session, _ids(made)).values() for j in ids]
    swept = (Kind.images, Kind.answers, Kind.results) if made.kind is Kind.jobs else (made.kind,)
    for kind in swept:
        _delete_kind(session, kind, job_ids)
    if made.kind is Kind.jobs:
        _delete_study_rows(session, _ids(made), [s.study_uid for s in made.studies], job_ids)
    entries = [Removal(folder=d.folder.value, path=d.path, marked_at=at) for d in made.files]
    session.add_all(entries)
    _tally(session, made)
    _audit(session, made, at)


def _ids(made: Plan) -> list[int]:
    return [study.study_id for study in made.studies]


def _delete_kind(session: Session, kind: Kind, job_ids: list[int]) -> None:
    for batch in _batches(job_ids):
        if kind is Kind.answers:
            session.execute(delete(Result).where(col(Result.job_id).in_(batch)))
            continue
        model = Instance if kind is Kind.images else ResultObject
        uids = select(model.sop_instance_uid).where(col(model.job_id).in_(batch))
        session.execute(delete(QueryRecord).where(col(QueryRecord.sop_instance_uid).in_(uids)))
        session.execute(delete(model).where(col(model.job_id).in_(batch)))


def _delete_study_rows(
    session: Session, study_ids: list[int], study_uids: list[str], job_ids: list[int]
) -> None:
    """Every row hanging off the studies, children before parents (foreign keys are on)."""
    for batch in _batches(study_ids):
        workitems = select(Workitem.sop_instance_uid).where(col(Workitem.study_id).in_(batch))
        session.execute(
            delete(UpsSubscription).where(col(UpsSubscription.workitem_uid).in_(workitems))
        )
        for model in (Publication, StudyPriority, Workitem):
            session.execute(delete(model).where(col(model.study_id).in_(batch)))
    for batch in _batches(job_ids):
        session.execute(delete(Delivery).where(col(Delivery.job_id).in_(batch)))
        session.execute(delete(Feedback).where(col(Feedback.job_id).in_(batch)))  # the reports'
        session.execute(delete(ShadowRun).where(col(ShadowRun.job_id).in_(batch)))
        session.execute(delete(Job).where(col(Job.id).in_(batch)))
    for batch in _batches(study_uids):
        session.execute(delete(CompletionSignal).where(col(CompletionSignal.study_uid).in_(batch)))
        session.execute(delete(ResultSeries).where(col(ResultSeries.study_uid).in_(batch)))
    for batch in _batches(study_ids):
        session.execute(delete(Study).where(col(Study.id).in_(batch)))


def _tally(session: Session, made: Plan) -> None:
    for kind, amount in made.totals().items():
        add_to_tally(session, kind, made.reason, amount.objects, amount.bytes)


def add_to_tally(session: Session, kind: Kind, reason: Reason, objects: int, size: int) -> None:
    row = session.get(RemovedTally, (kind.value, reason.value))
    if row is None:
        row = RemovedTally(kind=kind.value, reason=reason.value)
    row.objects += objects
    row.bytes += size
    session.add(row)


def _audit(session: Session, made: Plan, at: dt.datetime) -> None:
    """One event per study: what went, and why (the trail may name studies; logs do not)."""
    last_change = {study.study_uid: study.last_change for study in made.studies}
    for study_uid, kinds in made.removed.items():
        session.add(
            AuditEvent(
                at=at,
                kind=AuditKind.retention_removed,
                actor="node",
                outcome=AuditOutcome.removed,
                details={
                    "study_uid": study_uid,
                    "kind": made.kind.value,
                    "reason": made.reason.value,
                    "last_change": last_change[study_uid].isoformat(),
                    "removed": {
                        kind.value: {"objects": amount.objects, "bytes": amount.bytes}
                        for kind, amount in kinds.items()
                    },
                },
            )
        )


def _batches(values: Sequence[Any]) -> Iterator[list[Any]]:
    items = list(values)
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


class Journal:
    """Steps 2 and 3: delete journalled files, then their entries."""

    def __init__(
        self, database: Database, storage: StorageSettings, spool_locks: Keyed
    ) -> None:
        self.database = database
        self.places = folders(storage)
        self.spool_locks = spool_locks  # receive's own, shared: see the module doc
        self._stuck: set[int] = set()  # entries whose file would not go: not again this pass

    def finish(self) -> int:
        """Delete the files of the journal's entries, then the entries; the number finished.
        One whose file cannot be deleted stays (logged) for the next pass."""
        done = 0
        while True:
            with self.database.session() as session:
                query = select(Removal).where(col(Removal.id).not_in(self._stuck))
                entries = list(session.exec(query.order_by(col(Removal.id)).limit(BATCH)))
            if not entries:
                return done
            gone = self._delete_files(entries)
            with self.database.session() as session:
                for batch in _batches(gone):
                    session.execute(delete(Removal).where(col(Removal.id).in_(batch)))
                session.commit()
            done += len(gone)
            self._stuck.update(e.id for e in entries if e.id is not None and e.id not in gone)

    def retry_stuck(self) -> None:
        """A new pass: try the files that would not go again."""
        self._stuck.clear()

    def _delete_files(self, entries: list[Removal]) -> list[int]:
        gone: list[int] = []
        touched: set[Path] = set()
        with self.database.session() as session:
            for entry in entries:
                path = self.places[Folder(entry.folder)] / entry.path
                try:
                    self._delete(session, Folder(entry.folder), entry.path, path)
                except OSError as error:
                    log.error("retention.unlink_failed", folder=entry.folder, error=error.strerror)
                    continue
                touched.add(path.parent)
                if entry.id is not None:
                    gone.append(entry.id)
        for folder in touched:
            _flush_folder(folder)  # the deletion survives a power cut before step 3's commit
        for folder in sorted(touched, key=lambda f: len(f.parts), reverse=True):
            _prune_empty(folder, stop_at=set(self.places.values()))
        return gone

    def _delete(self, session: Session, folder: Folder, relative: str, path: Path) -> None:
        if folder is not Folder.spool:
            path.unlink(missing_ok=True)
            return
        uid = Path(relative).stem  # spool/<study>/<series>/<SOP Instance UID>.dcm
        with self.spool_locks.hold(uid):  # receive holds it from "file there?" to its commit
            again = session.exec(
                select(Instance.path).where(Instance.sop_instance_uid == uid)
            ).first()
            session.rollback()  # no snapshot kept: the next file looks at the latest commit
            if again != relative:  # else it arrived again and the file is its row's now
                path.unlink(missing_ok=True)


def _flush_folder(folder: Path) -> None:
    try:
        fsync_path(folder)
    except FileNotFoundError:
        return  # gone already


def _prune_empty(folder: Path, stop_at: set[Path]) -> None:
    """Remove `folder` and its parents while empty, up to a data folder itself. (A C-STORE
    of a new instance of the same series in the instant between its folder being made and
    its file opened fails, and is answered so: the modality sends it again.)"""
    while folder not in stop_at and folder.parent != folder:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone, or a file arriving): leave it
        folder = folder.parent


def counted(made: Plan) -> Counter[str]:
    """The plan's totals as flat counts for a log event (no study identifiers)."""
    flat: Counter[str] = Counter()
    for kind, amount in made.totals().items():
        flat[f"{kind.value}_objects"] += amount.objects
        flat[f"{kind.value}_bytes"] += amount.bytes
    flat[f"{made.kind.value}_studies"] += len(made.studies)
    return flat
