"""Locks that hold across processes as well as threads.

With several receiver processes (cadnode/port.py) the stages and the receivers share
the data folder and the database, so a read-modify-write that a `threading.Lock` guarded in
one process needs a lock the kernel keeps: `fcntl` locks on files in `<data dir>/locks/`.
The kernel drops them when their process dies, so a crash never leaves one held.

POSIX record locks (`lockf`) belong to a process, not a thread: threads of one process first
queue here, and only then ask the kernel.

On PostgreSQL, where several nodes on several machines share the data dir, the same locks
are the database's session-level advisory locks instead (`pg_advisory_lock` and kin, keyed
by 64 bits of a hash of the lock's name and key), held on one dedicated connection per
process and name: no lock files at all, and the server drops them when the process's
connection ends (a killed process; a lost machine once TCP keepalive gives up on it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Protocol

import structlog
from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

from cadnode.core import connection
from cadnode.core.db import Database

log = structlog.get_logger("cadnode.core.locks")

# How long a wait for a lock another process holds sleeps between asks, at most (PostgreSQL:
# a try, never a blocking call, so the process's other threads keep the connection).
_POLL_MAX_S = 0.05


def on_postgresql(database: Database) -> bool:
    return database.kind == connection.POSTGRESQL


def lock_file(database: Database, name: str) -> Path:
    """`<data dir>/locks/<name>.lock`: beside the SQLite database every process opens."""
    if database.file is None:
        raise ValueError(f"lock {name!r}: no lock files on PostgreSQL, its locks are advisory")
    folder = database.file.parent / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.lock"


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class _Kernel(Protocol):
    """What a named lock asks of whoever keeps it across processes (the kernel, the database)."""

    def acquire(self, wait: bool) -> bool: ...

    def release(self) -> None: ...


class _FileKernel:
    def __init__(self, path: Path) -> None:
        self._descriptor = _open(path)

    def acquire(self, wait: bool) -> bool:
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        fcntl.flock(self._descriptor, fcntl.LOCK_UN)


class _Advisory:
    """One dedicated PostgreSQL connection of this process (outside the sessions' pool), on
    which its advisory locks of one name are held; calls on it are serialized."""

    def __init__(self, database: Database, name: str) -> None:
        self.name = name
        self._engine = connection.engine(database.url, pooled=False)  # outside the pool
        self._connection = self._connect()
        self._guard = threading.Lock()

    def _connect(self) -> Connection:
        return self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def key(self, key: str = "") -> int:
        digest = hashlib.blake2b(f"{self.name}\0{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)

    def ask(self, function: str, key: int) -> bool:
        asked = text(f"SELECT {function}(:key)")
        with self._guard:
            try:
                return bool(self._connection.execute(asked, {"key": key}).scalar())
            except OperationalError:  # the server restarted (its locks went with it): again
                log.warning("locks.reconnected", name=self.name)
                self._connection = self._connect()
                return bool(self._connection.execute(asked, {"key": key}).scalar())

    def wait_for(self, function: str, key: int) -> None:
        pause = 0.001
        while not self.ask(function, key):
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)

    def close(self) -> None:
        with self._guard:
            self._connection.close()


class _AdvisoryKernel:
    def __init__(self, database: Database, name: str) -> None:
        self._advisory = _Advisory(database, name)
        self._key = self._advisory.key()

    def acquire(self, wait: bool) -> bool:
        if wait:
            self._advisory.wait_for("pg_try_advisory_lock", self._key)
            return True
        return self._advisory.ask("pg_try_advisory_lock", self._key)

    def release(self) -> None:
        self._advisory.ask("pg_advisory_unlock", self._key)


class ProcessLock:
    """Exclusive across threads and processes (on PostgreSQL: across machines), reentrant
    within a thread. Given a path: a `flock` on that file."""

    def __init__(self, kernel: Path | _Kernel) -> None:
        self._kernel = _FileKernel(kernel) if isinstance(kernel, Path) else kernel
        self._threads = threading.RLock()
        self._depth = 0

    def __enter__(self) -> ProcessLock:
        self._threads.acquire()
        if self._depth == 0:
            try:
                self._kernel.acquire(wait=True)
            except BaseException:
                self._threads.release()
                raise
        self._depth += 1
        return self

    def __exit__(
        self,
        _kind: type[BaseException] | None,
        _error: BaseException | None,
        _trace: TracebackType | None,
    ) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._kernel.release()
        self._threads.release()

    @contextmanager
    def if_free(self) -> Iterator[bool]:
        """Hold the lock if no one else does, without waiting: yields whether it is held
        (a task that one process at a time does, and any may do: housekeeping, watchdogs)."""
        if not self._threads.acquire(blocking=False):
            yield False
            return
        try:
            if self._depth == 0 and not self._kernel.acquire(wait=False):
                yield False
                return
            self._depth += 1
            try:
                yield True
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._kernel.release()
        finally:
            self._threads.release()


_named: dict[tuple[str, str], ProcessLock] = {}
_named_guard = threading.Lock()


def _place(database: Database, name: str) -> tuple[str, str]:
    """Where the lock called `name` lives: its file, or the database's URL."""
    if on_postgresql(database):
        return database.engine.url.render_as_string(hide_password=True), name
    return str(lock_file(database, name)), ""


def named_lock(database: Database, name: str) -> ProcessLock:
    """The process's one lock called `name` for this database (one descriptor or connection
    per process: two of one process would exclude each other)."""
    place = _place(database, name)
    with _named_guard:
        if place not in _named:
            kernel: Path | _Kernel = (
                _AdvisoryKernel(database, name) if on_postgresql(database) else Path(place[0])
            )
            _named[place] = ProcessLock(kernel)
        return _named[place]


# Keyed by SOP Instance UID: receive holds it from "is its file there?" to its commit, and
# housekeeping while it deletes an old copy (cadnode.ingest.spool, cadnode.retain.removal).
SPOOL_INSTANCE_LOCKS = "spool-instances"


class Keyed(Protocol):
    """One lock per key, exclusive across threads and processes; and marks (shared locks)
    that say "this process is using the key"."""

    def hold(
        self, key: str, before_waiting: Callable[[], None] | None = None
    ) -> contextlib.AbstractContextManager[None]: ...

    def mark(self, key: str) -> None: ...

    def unmark(self, key: str) -> None: ...

    def marked_elsewhere(self, key: str) -> bool: ...

    def close(self) -> None: ...


_keyed: dict[tuple[str, str], Keyed] = {}


def keyed_locks(database: Database, name: str) -> Keyed:
    """The process's one set of keyed locks called `name` for this database: two users of
    the same keys in one process (receive and housekeeping) must share one (`lockf` locks
    of two descriptors of one process never exclude each other). Never closed."""
    place = _place(database, name)
    with _named_guard:
        if place not in _keyed:
            _keyed[place] = new_keyed_locks(database, name)
        return _keyed[place]


def new_keyed_locks(database: Database, name: str) -> Keyed:
    """A set of keyed locks of its own (its caller closes it): for a sole user of `name`."""
    if on_postgresql(database):
        return AdvisoryKeyedLocks(database, name)
    return KeyedLocks(lock_file(database, name))


def _offset(key: str) -> int:
    """A key's byte in the lock file: 48 bits of its hash (a collision only means two keys
    wait on each other, or a study looks busy when it is not)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=6).digest(), "big")


def _call(work: Callable[[], None] | None) -> None:
    if work is not None:
        work()


class _ThreadQueue:
    """Threads of one process wait here for a key before asking the kernel or the database,
    which only tell processes apart."""

    def __init__(self) -> None:
        self._held: set[int] = set()
        self._settled = threading.Condition()

    @contextmanager
    def turn(self, slot: int, before_waiting: Callable[[], None] | None = None) -> Iterator[None]:
        with self._settled:
            free = slot not in self._held
            if free:
                self._held.add(slot)
        if not free:
            _call(before_waiting)
            with self._settled:
                self._settled.wait_for(lambda: slot not in self._held)
                self._held.add(slot)
        try:
            yield
        finally:
            with self._settled:
                self._held.discard(slot)
                self._settled.notify_all()


class KeyedLocks:
    """Keyed locks in one file: a byte per key (`lockf`).

    `hold` is exclusive across threads and processes. `mark` / `unmark` take and drop a shared
    lock that says "this process is using the key"; `marked_elsewhere` says whether another
    process does (the caller keeps at most one mark per key: its threads count for it).
    """

    def __init__(self, path: Path) -> None:
        self._descriptor = _open(path)
        self._threads = _ThreadQueue()

    def close(self) -> None:
        os.close(self._descriptor)

    @contextmanager
    def hold(self, key: str, before_waiting: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold `key`; `before_waiting` is called if another thread or process holds it, before
        this one waits (a caller holding other keys lets them go: no cycle of waits)."""
        offset = _offset(key)
        with self._threads.turn(offset, before_waiting):
            try:
                fcntl.lockf(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            except OSError:  # held by another process
                _call(before_waiting)
                self._wait_for(offset, before_waiting)
            try:
                yield
            finally:
                fcntl.lockf(self._descriptor, fcntl.LOCK_UN, 1, offset)

    def _wait_for(self, offset: int, before_waiting: Callable[[], None] | None) -> None:
        """Wait for the key's byte. POSIX locks belong to processes, not threads, so the
        kernel can see a cycle where there is none (this process's thread waits on another
        process, one of whose threads waits on a key another thread here will let go): it
        answers EDEADLK at once; then the wait is tried again, a little later."""
        pause = 0.001
        while True:
            try:
                fcntl.lockf(self._descriptor, fcntl.LOCK_EX, 1, offset)
                return
            except OSError as error:
                if error.errno != errno.EDEADLK:
                    raise
                log.info("locks.cycle_reported", key_hash=offset, retry_in_s=pause)
            _call(before_waiting)
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)

    def mark(self, key: str) -> None:
        fcntl.lockf(self._descriptor, fcntl.LOCK_SH, 1, _offset(key))

    def unmark(self, key: str) -> None:
        fcntl.lockf(self._descriptor, fcntl.LOCK_UN, 1, _offset(key))

    def marked_elsewhere(self, key: str) -> bool:
        """Whether another process marks `key`; call it while this one marks it."""
        offset = _offset(key)
        try:  # turning our shared lock exclusive fails exactly when another process shares it
            fcntl.lockf(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError:
            return True
        fcntl.lockf(self._descriptor, fcntl.LOCK_SH, 1, offset)
        return False


class AdvisoryKeyedLocks:
    """The same as KeyedLocks, as PostgreSQL advisory locks (64 bits of the name's and key's
    hash): they exclude processes on every machine that shares the database."""

    def __init__(self, database: Database, name: str) -> None:
        self._advisory = _Advisory(database, name)
        self._threads = _ThreadQueue()

    def close(self) -> None:
        self._advisory.close()

    @contextmanager
    def hold(self, key: str, before_waiting: Callable[[], None] | None = None) -> Iterator[None]:
        slot = self._advisory.key(key)
        with self._threads.turn(slot, before_waiting):
            if not self._advisory.ask("pg_try_advisory_lock", slot):  # held elsewhere
                _call(before_waiting)
                self._advisory.wait_for("pg_try_advisory_lock", slot)
            try:
                yield
            finally:
                self._advisory.ask("pg_advisory_unlock", slot)

    def mark(self, key: str) -> None:
        self._advisory.wait_for("pg_try_advisory_lock_shared", self._advisory.key(key))

    def unmark(self, key: str) -> None:
        self._advisory.ask("pg_advisory_unlock_shared", self._advisory.key(key))

    def marked_elsewhere(self, key: str) -> bool:
        """Whether another process marks `key`; call it while this one marks it (a session's
        own shared lock never conflicts with its exclusive one)."""
        slot = self._advisory.key(key)
        if not self._advisory.ask("pg_try_advisory_lock", slot):
            return True
        self._advisory.ask("pg_advisory_unlock", slot)
        return False
