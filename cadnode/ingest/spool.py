"""The spool: each received instance as a file, and its row in the index.

An instance is stored in two steps: `secure` makes its bytes durable, `settle` puts its file
in place and commits its index row. Its bytes (up to 1 MiB) are made durable by one record
in the spool's journal and one fdatasync; `settle` then makes its file under a temporary
name and renames it into place, flushed later in bulk (cadnode/ingest/journal.py). A larger
instance's, or any with `storage.spool_journal: false`, are made durable by its file itself
(written under a temporary name, fsynced, renamed, the folder fsynced). Receive answers
Success once both steps are done, or, on SQLite with the event-driven reactor, once the
bytes are durable, settling after the answer (`answers_before_index`): a kill between the
two leaves the bytes in the journal (or the file in place), made and indexed at the next
start. The file is the record of truth. The index commit
is atomic and survives the process being killed (SQLite WAL), but receive's connection
does not wait for the disk on each commit (synchronous=NORMAL): a row that a power cut
takes back is rebuilt from its file by `reconcile` at the next start, so one disk flush
per instance is saved.
On PostgreSQL every index commit is durable (the server may serve other nodes, which do not
reconcile when it restarts), and a study's rows are written by one transaction at a time (an
advisory lock on the study, where SQLite has its one writer).

`reconcile` runs before the node accepts associations: the journal is replayed first (the
files of acknowledged instances a power cut took back are made again), then a file without
a row is indexed if it is a whole DICOM object, else moved to the quarantine folder; a row
whose file is gone is marked (`Instance.missing_since`) and logged; temporaries of
interrupted writes are removed.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import Connection, bindparam, func, insert, literal_column, update
from sqlmodel import col, select

from cadnode.core.connection import TRANSIENT_TRIES, transient
from cadnode.core.db import Database, Instance, Job, JobState, Study, utcnow
from cadnode.core.files import is_temporary, is_valid_uid, write_durably
from cadnode.core.locks import SPOOL_INSTANCE_LOCKS, keyed_locks
from cadnode.ingest.journal import LARGEST_RECORD, Chunks, Journal, Recorded, recover

log = structlog.get_logger("cadnode.ingest.spool")

# PostgreSQL's advisory lock namespace for a study's index writes ("spol" in ASCII).
STUDY_LOCK_KEY = 0x73706F6C
HEADER_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
UNDEFINED_LENGTH = 0xFFFFFFFF


class OutOfSpace(Exception):
    """Free space under the spool is below the watermark."""


@dataclass(frozen=True)
class Arrival:
    """What the index records about an instance, from its header and its association."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    peer: str

    @functools.cached_property
    def relative_path(self) -> Path:
        # Cached: asked for several times per instance on receive's hot path.
        return Path(f"{self.study_uid}/{self.series_uid}/{self.sop_instance_uid}.dcm")


@dataclass(frozen=True)
class Indexed:
    """Where an instance went: its job, and whether that job is new (a study or a version)."""

    job_id: int
    study_id: int
    version: int
    instance_count: int

    @property
    def opened_job(self) -> bool:
        return self.instance_count == 1


@dataclass(frozen=True)
class Secured:
    """An instance whose bytes are durable (or that was stored before), its file and index
    row still to be made by `Spool.settle`."""

    arrival: Arrival
    size: int
    stored_before: bool = False  # its file was in place: a copy sent before
    recorded: Recorded | None = None  # its journal record, whose spool file is to be made
    chunks: Chunks = ()  # the bytes, for that file


class DiskGuard:
    """Free space under the spool against the watermark, logging each change of state once."""

    def __init__(self, folder: Path, min_free_bytes: int) -> None:
        self.folder = folder
        self.min_free_bytes = min_free_bytes
        self._low = False
        self._lock = threading.Lock()

    def check(self, incoming: int) -> None:
        free = shutil.disk_usage(self.folder).free
        low = free - incoming < self.min_free_bytes
        with self._lock:
            changed, self._low = low != self._low, low
        if changed and low:
            log.warning("disk.low", free_mb=free // 2**20, min_free_mb=self.min_free_bytes // 2**20)
        elif changed:
            log.info("disk.recovered", free_mb=free // 2**20)
        if low:
            watermark = self.min_free_bytes // 2**20
            raise OutOfSpace(f"{free // 2**20} MB free, below the {watermark} MB watermark")


class Spool:
    def __init__(
        self, folder: Path, database: Database, min_free_bytes: int, journal: bool = True
    ) -> None:
        self.folder = folder
        self.database = database
        folder.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(folder) if journal else None
        self.disk = DiskGuard(folder, min_free_bytes)
        # One connection for every association thread, one index write at a time: SQLite
        # takes one writer anyway, and a held connection skips the pool on the hot path.
        self._lock = threading.Lock()
        self._connection = self._connect()
        self._writer = _IndexWriter(self._connection)
        # A second copy of a SOP Instance UID being written now waits for the first to settle,
        # in this process or another receiver process (cadnode/port.py); housekeeping takes
        # the same lock to delete an old copy (cadnode.retain.removal).
        self._instances = keyed_locks(database, SPOOL_INSTANCE_LOCKS)

    def _connect(self) -> Connection:
        connection = self.database.engine.connect()
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA synchronous=NORMAL")  # see the module doc
            connection.commit()
        return connection

    def _reconnect_if_broken(self) -> None:
        """A PostgreSQL connection lost (the server restarted): the next write opens a new
        one; the write that found it lost has failed, and its sender is answered so."""
        if getattr(self._writer.driver, "broken", False):
            self._connection.invalidate()
            self._connection.close()
            self._connection = self._connect()
            self._writer = _IndexWriter(self._connection)
            log.warning("spool.reconnected")

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        with self._lock:
            if self._connection.closed:
                return
            # Never hand a NORMAL-synchronous connection back to the pool the stages share.
            self._connection.invalidate()
            self._connection.close()

    @property
    def answers_before_index(self) -> bool:
        """Whether receive may answer Success once an instance is secured, and settle it
        after: on SQLite, whose index only this node writes and `reconcile` rebuilds from
        the files. A PostgreSQL server may be away, and a sender told so sends again."""
        return self._connection.dialect.name == "sqlite"

    def store(self, arrival: Arrival, chunks: Chunks) -> Indexed | None:
        """Write and index one instance; None when it was stored already (a duplicate)."""
        with ExitStack() as held:
            return self.settle(self.secure(arrival, chunks, held))

    def secure(
        self,
        arrival: Arrival,
        chunks: Chunks,
        held: ExitStack,
        meanwhile: Callable[[], None] | None = None,
    ) -> Secured:
        """Make an instance's bytes durable: by the journal, whose record makes its file in
        `settle`, or in place. The instance's lock is held on `held` (the caller closes it
        after `settle`): a second copy of its SOP Instance UID waits for it.

        A file already at the instance's place is a copy stored before (files only get there
        whole, see `write_durably`): it is kept, not rewritten, and indexed if it is not yet.

        `meanwhile`: the caller's earlier work, done while the journal flushes the record, or
        before this waits for the instance's lock (that work may hold other instances' locks).
        It may be done twice or not at all here: the caller calls it again after.
        """
        relative = arrival.relative_path
        path = self.folder / relative
        held.enter_context(self._instances.hold(arrival.sop_instance_uid, meanwhile))
        if path.exists():
            return Secured(arrival, path.stat().st_size, stored_before=True)
        incoming = sum(len(chunk) for chunk in chunks)
        self.disk.check(incoming)
        if self.journal is not None and incoming <= LARGEST_RECORD:
            recorded = self.journal.record(relative, chunks, meanwhile)
            return Secured(arrival, recorded.size, recorded=recorded, chunks=chunks)
        return Secured(arrival, write_durably(path, chunks))

    def settle(self, secured: Secured) -> Indexed | None:
        """Make a secured instance's file and commit its row; None if it was indexed before
        (a duplicate)."""
        arrival, relative = secured.arrival, secured.arrival.relative_path
        if secured.recorded is not None and self.journal is not None:
            self.journal.make_file(secured.recorded, secured.chunks)
        indexed = self.index(arrival, relative, secured.size)
        if secured.stored_before or indexed is not None:
            return indexed
        if self._indexed_path(arrival.sop_instance_uid) != str(relative):
            # The same SOP Instance UID, stored before under another study or series.
            (self.folder / relative).unlink()
        return indexed

    def index(self, arrival: Arrival, path: Path, size: int) -> Indexed | None:
        """Commit the row of a file already in place; None if the instance is indexed."""
        with self._lock:
            attempt = 1
            while True:
                self._reconnect_if_broken()
                try:
                    with self._writer.transaction():
                        return self._writer.write(arrival, str(path), size)
                except Exception as error:  # the driver's own: the writer runs on its cursor
                    # Rolled back whole: the same write again, not a failure the sender sees.
                    if attempt == TRANSIENT_TRIES or not transient(error):
                        raise
                    log.warning("spool.retried", attempt=attempt, error=type(error).__name__)
                    attempt += 1

    def _indexed_path(self, sop_instance_uid: str) -> str | None:
        with self._lock:
            path = self._writer.indexed_path(sop_instance_uid)
            self._connection.rollback()
        return path

    def reconcile(self, quarantine: Path) -> dict[str, int]:
        """Make spool and index agree; run before the first association is accepted."""
        recover(self.folder)  # whatever the journal setting is now
        with self._lock:
            rows = {
                row.path: row
                for row in self._connection.execute(
                    select(Instance.path, Instance.missing_since, Instance.job_id)
                )
            }
            self._connection.rollback()
        counts = {"temporaries_removed": 0, "indexed": 0, "quarantined": 0, "missing": 0}
        seen: set[str] = set()
        for file in _spool_files(self.folder):
            if is_temporary(file):
                file.unlink(missing_ok=True)  # an interrupted write: never acknowledged
                counts["temporaries_removed"] += 1
                continue
            relative = file.relative_to(self.folder)
            seen.add(str(relative))
            if str(relative) in rows:
                continue
            counts[self._adopt(file, relative, quarantine)] += 1
        missing = [
            row for path, row in rows.items() if path not in seen and row.missing_since is None
        ]
        found = [
            path for path, row in rows.items() if path in seen and row.missing_since is not None
        ]
        self._mark_missing([row.path for row in missing], found)
        for job in sorted({row.job_id for row in missing}):
            log.error(
                "spool.file_missing",
                job=job,
                instances=sum(1 for row in missing if row.job_id == job),
            )
        counts["missing"] = len(missing)
        log.info("spool.reconciled", **counts, instances=len(rows))
        return counts

    def _adopt(self, file: Path, relative: Path, quarantine: Path) -> str:
        """Index a file that has no row, or move it aside; returns the count it adds to."""
        arrival, problem = examine(file)
        if arrival is not None and self.index(arrival, relative, file.stat().st_size) is not None:
            log.info("spool.indexed", path=str(relative))
            return "indexed"
        problem = problem or "its SOP Instance UID is indexed under another file"
        target = quarantine / utcnow().strftime("%Y%m%dT%H%M%S") / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
        log.warning("spool.quarantined", path=str(relative), reason=problem)
        return "quarantined"

    def _mark_missing(self, missing: list[str], found: list[str]) -> None:
        now = utcnow()
        with self._lock:
            for paths, value in ((missing, now), (found, None)):
                if paths:
                    self._connection.execute(
                        update(Instance)
                        .where(Instance.path.in_(paths))  # type: ignore[attr-defined]
                        .values(missing_since=value)
                    )
            self._connection.commit()


class _Compiled:
    """A statement compiled once from the models and run on the driver's own connection.

    The index write is receive's hot path, and SQLAlchemy's work per execution (cache keys,
    result set-up) cost more than SQLite's. Values still go through each column type's own
    processors, so what is stored reads back through the ORM exactly as if it had written it.
    """

    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        # SQLite's driver takes parameters in order (qmark), psycopg by name (pyformat).
        self.positional = compiled.positiontup is not None
        self.names = list(compiled.positiontup if self.positional else compiled.params)
        self.defaults = compiled.params  # bound literals such as LIMIT's
        types = [compiled.binds[name].type.dialect_impl(dialect) for name in self.names]
        self.binds = [kind.bind_processor(dialect) for kind in types]
        columns = getattr(statement, "selected_columns", [])
        kinds = [column.type.dialect_impl(dialect) for column in columns]
        self.results = [kind.result_processor(dialect, None) for kind in kinds]

    def bound(self, values: dict[str, Any]) -> list[Any] | dict[str, Any]:
        """The statement's parameters, each through its column type's processor."""
        ordered = (values[n] if n in values else self.defaults[n] for n in self.names)
        processed = [p(v) if p else v for p, v in zip(self.binds, ordered, strict=True)]
        return processed if self.positional else dict(zip(self.names, processed, strict=True))

    def run(self, cursor: Any, **params: Any) -> list[tuple[Any, ...]]:
        cursor.execute(self.sql, self.bound(params))
        rows = cursor.fetchall() if cursor.description is not None else []  # not an UPDATE
        return [tuple(p(v) if p else v for p, v in zip(self.results, r, strict=True)) for r in rows]


class _IndexWriter:
    """One instance's row, its study's and its job's, in the caller's transaction."""

    def __init__(self, connection: Connection) -> None:
        dialect = connection.dialect
        self.sqlite = dialect.name == "sqlite"
        self.driver = connection.connection.driver_connection
        self.cursor = self.driver.cursor()  # type: ignore[union-attr]
        self.instance = _Compiled(
            select(Instance.job_id, Instance.missing_since, Instance.path).where(
                Instance.sop_instance_uid == bindparam("uid")
            ),
            dialect,
        )
        self.restore = _Compiled(
            update(Instance)
            .where(Instance.sop_instance_uid == bindparam("uid"))  # type: ignore[arg-type]
            .values(missing_since=None, path=bindparam("path"), size=bindparam("size")),
            dialect,
        )
        self.study = _Compiled(
            select(Study.id).where(Study.study_uid == bindparam("study_uid")), dialect
        )
        self.latest_job = _Compiled(
            select(Job.id, Job.version, Job.state, Job.instance_count)
            .where(Job.study_id == bindparam("study_id"))
            .order_by(Job.version.desc())  # type: ignore[attr-defined]
            .limit(1),
            dialect,
        )
        self.one_more = _Compiled(
            update(Job)
            .where(Job.id == bindparam("job_id"))  # type: ignore[arg-type]
            .values(instance_count=bindparam("count"), last_instance_at=bindparam("now")),
            dialect,
        )
        # Every column (the model has the defaults); the new row's id back where it has one.
        self.inserts: dict[type[Any], _Compiled] = {
            model: _Compiled(_insert_new(model).returning(col(model.id)), dialect)
            for model in (Study, Job)
        }
        self.inserts[Instance] = _Compiled(insert(Instance), dialect)
        self.study_lock = _Compiled(
            select(
                func.pg_advisory_xact_lock(
                    literal_column(str(STUDY_LOCK_KEY)), func.hashtext(bindparam("uid"))
                )
            ),
            dialect,
        )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One snapshot for the reads and the writes (BEGIN IMMEDIATE), committed on the
        DB-API connection: through SQLAlchemy, the BEGIN alone cost as much as an insert."""
        if self.sqlite:  # psycopg begins one itself
            self.cursor.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.driver.rollback()  # type: ignore[union-attr]
            raise
        self.driver.commit()  # type: ignore[union-attr]

    def write(self, arrival: Arrival, path: str, size: int) -> Indexed | None:
        uid = arrival.sop_instance_uid
        now = utcnow()
        if not self.sqlite:  # one writer per study at a time, as SQLite's one writer
            self.study_lock.run(self.cursor, uid=arrival.study_uid)
        for job_id, missing_since, _ in self.instance.run(self.cursor, uid=uid):
            if missing_since is not None:  # its file had gone: a resend brings it back
                self.restore.run(self.cursor, uid=uid, path=path, size=size)
                log.info("instance.restored", job=job_id)
            return None
        found = self.study.run(self.cursor, study_uid=arrival.study_uid)
        study_id = found[0][0] if found else self._insert(Study(study_uid=arrival.study_uid))
        latest = self.latest_job.run(self.cursor, study_id=study_id)
        if latest and latest[0][2] == JobState.received:
            job_id, version, count = latest[0][0], latest[0][1], latest[0][3] + 1
            self.one_more.run(self.cursor, job_id=job_id, count=count, now=now)
        else:
            # A first instance, or one after the study was released: a new job version.
            version, count = (latest[0][1] + 1 if latest else 1), 1
            job = Job(
                study_id=study_id,
                version=version,
                instance_count=1,
                first_instance_at=now,
                last_instance_at=now,
                updated_at=now,
            )
            job_id = self._insert(job)
            if latest:
                log.info("job.reopened", job=job_id, study=study_id, version=version)
        instance = self.inserts[Instance]
        values = instance_row(arrival, path, size, job_id, now)
        self.cursor.execute(instance.sql, instance.bound(values))
        return Indexed(job_id=job_id, study_id=study_id, version=version, instance_count=count)

    def indexed_path(self, sop_instance_uid: str) -> str | None:
        found = self.instance.run(self.cursor, uid=sop_instance_uid)
        return str(found[0][2]) if found else None

    def _insert(self, row: Any) -> int:
        """Insert a row built by its model (which fills every default); its new id."""
        statement = self.inserts[type(row)]
        self.cursor.execute(
            statement.sql, statement.bound({n: getattr(row, n) for n in statement.names})
        )
        return int(self.cursor.fetchone()[0])


def _insert_new(model: Any) -> Any:
    """Every column but the id, which the database gives (PostgreSQL's identity takes no NULL)."""
    columns = [column.name for column in model.__table__.columns if column.name != "id"]
    return insert(model).values({name: bindparam(name) for name in columns})


def instance_row(
    arrival: Arrival, path: str, size: int, job_id: int, now: dt.datetime
) -> dict[str, Any]:
    """Every column of an instance's index row. (Building an Instance model to fill in
    defaults cost a fifth of the index write, once per instance.)"""
    return {
        "sop_instance_uid": arrival.sop_instance_uid,
        "sop_class_uid": arrival.sop_class_uid,
        "series_uid": arrival.series_uid,
        "transfer_syntax": arrival.transfer_syntax,
        "path": path,
        "size": size,
        "calling_ae": arrival.calling_ae,
        "called_ae": arrival.called_ae,
        "peer": arrival.peer,
        "job_id": job_id,
        "received_at": now,
        "missing_since": None,
    }


def examine(path: Path) -> tuple[Arrival | None, str | None]:
    """A spool file's arrival record, or why it is not a whole DICOM object."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = dcmread(path)
    except Exception as error:
        return None, f"unreadable: {error}"
    problem = _truncation(dataset, [str(w.message) for w in caught])
    if problem:
        return None, problem
    uids = {tag: str(dataset.get(tag, "")) for tag in HEADER_TAGS}
    bad = [tag for tag, value in uids.items() if not is_valid_uid(value)]
    if bad:
        return None, f"missing or invalid UID: {', '.join(bad)}"
    meta = dataset.file_meta
    return (
        Arrival(
            sop_class_uid=uids["SOPClassUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
            calling_ae=str(meta.get("SourceApplicationEntityTitle", "")).strip(),
            called_ae="",
            peer="",
        ),
        None,
    )


def _truncation(dataset: Dataset, warned: list[str]) -> str | None:
    """Why the file looks cut short, if it does (pydicom reads a short file without error)."""
    if any("End of file reached" in message for message in warned):
        return "truncated: an item or sequence has no end"
    problem = cut_short(dataset)
    if problem:
        return f"truncated: {problem}"
    if "Rows" in dataset and not any(keyword in dataset for keyword in PIXEL_KEYWORDS):
        return "truncated: an image without pixel data"
    if "PixelData" in dataset and not UID(dataset.file_meta.TransferSyntaxUID).is_compressed:
        expected = _native_pixel_bytes(dataset)
        if expected is not None and len(dataset.PixelData) < expected:
            return f"truncated: {len(dataset.PixelData)} of {expected} pixel bytes"
    return None


def cut_short(dataset: Dataset) -> str | None:
    """What is wrong if the encoded dataset ended early: pydicom reads a short value without
    complaint, so the last element's bytes are counted against its declared length."""
    tags = list(dataset.keys())
    if not tags:
        return "no data elements"
    last = dataset.get_item(tags[-1], keep_deferred=True)  # a deferred value: None, not read
    length = getattr(last, "length", UNDEFINED_LENGTH)
    value = getattr(last, "value", None)
    if length != UNDEFINED_LENGTH and isinstance(value, bytes) and len(value) < length:
        return f"the last element has {len(value)} of its {length} bytes"
    return None


def _native_pixel_bytes(dataset: Dataset) -> int | None:
    try:
        bits = int(dataset.Rows) * int(dataset.Columns) * int(dataset.SamplesPerPixel)
        bits *= int(dataset.BitsAllocated) * int(dataset.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return (bits + 7) // 8


def _spool_files(folder: Path) -> Iterator[Path]:
    for root, _folders, names in os.walk(folder):
        for name in names:
            if name.endswith(".dcm") or name.endswith(".part"):
                yield Path(root, name)
