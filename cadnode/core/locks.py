"""Locks that hold across processes as well as threads.

With several receiver processes (cadnode/port.py) the stages and the receivers share
the data folder and the database, so a read-modify-write that a `threading.Lock` guarded in
one process needs a lock the kernel keeps: `fcntl` locks on files in `<data dir>/locks/`.
The kernel drops them when their process dies, so a crash never leaves one held.

POSIX record locks (`lockf`) belong to a process, not a thread: threads of one process first
queue here, and only then ask the kernel.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from cadnode.core.db import Database


def lock_file(database: Database, name: str) -> Path:
    """`<data dir>/locks/<name>.lock`: beside the database every process opens."""
    folder = Path(str(database.engine.url.database)).parent / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.lock"


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class ProcessLock:
    """Exclusive across threads and processes, reentrant within a thread (`flock`)."""

    def __init__(self, path: Path) -> None:
        self._descriptor = _open(path)
        self._threads = threading.RLock()
        self._depth = 0

    def __enter__(self) -> ProcessLock:
        self._threads.acquire()
        if self._depth == 0:
            try:
                fcntl.flock(self._descriptor, fcntl.LOCK_EX)
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
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        self._threads.release()


_named: dict[Path, ProcessLock] = {}
_named_guard = threading.Lock()


def named_lock(database: Database, name: str) -> ProcessLock:
    """The process's one lock called `name` for this database (one descriptor per process:
    `flock` locks of two descriptors of one process would exclude each other)."""
    path = lock_file(database, name)
    with _named_guard:
        if path not in _named:
            _named[path] = ProcessLock(path)
        return _named[path]


# Keyed by SOP Instance UID: receive holds it from "is its file there?" to its commit, and
# housekeeping while it deletes an old copy (cadnode.ingest.spool, cadnode.retain.removal).
SPOOL_INSTANCE_LOCKS = "spool-instances"

_keyed: dict[Path, KeyedLocks] = {}


def keyed_locks(database: Database, name: str) -> KeyedLocks:
    """The process's one set of keyed locks called `name` for this database: `lockf` locks
    of two descriptors of one process never exclude each other, so two users of the same
    keys in one process (receive and housekeeping) must share one. Never closed."""
    path = lock_file(database, name)
    with _named_guard:
        if path not in _keyed:
            _keyed[path] = KeyedLocks(path)
        return _keyed[path]


def _offset(key: str) -> int:
    """A key's byte in the lock file: 48 bits of its hash (a collision only means two keys
    wait on each other, or a study looks busy when it is not)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=6).digest(), "big")


class KeyedLocks:
    """One lock per key (a SOP Instance UID, a Study UID): a byte of one file each (`lockf`).

    `hold` is exclusive across threads and processes. `mark` / `unmark` take and drop a shared
    lock that says "this process is using the key"; `marked_elsewhere` says whether another
    process does (the caller keeps at most one mark per key: its threads count for it).
    """

    def __init__(self, path: Path) -> None:
        self._descriptor = _open(path)
        self._held: set[int] = set()
        self._settled = threading.Condition()

    def close(self) -> None:
        os.close(self._descriptor)

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        offset = _offset(key)
        with self._settled:
            self._settled.wait_for(lambda: offset not in self._held)
            self._held.add(offset)
        try:
            fcntl.lockf(self._descriptor, fcntl.LOCK_EX, 1, offset)
            try:
                yield
            finally:
                fcntl.lockf(self._descriptor, fcntl.LOCK_UN, 1, offset)
        finally:
            with self._settled:
                self._held.discard(offset)
                self._settled.notify_all()

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
