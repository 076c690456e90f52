"""The spool's journal: an instance is durable after one append and one fdatasync.

Writing each spool file durably costs two flushes before the answer (the file's data,
then the folder's entry after the rename). Here an instance's bytes (up to `LARGEST_RECORD`:
the spool writes larger ones durably in place) are appended to a
journal segment, with its place in the spool and a CRC, and the segment is fdatasynced
once (threads appending at the same time share flushes); only then is its spool file made,
under a temporary name renamed into place, without a flush of its own. Receive answers
Success after that and the index commit (cadnode/ingest/spool.py).

A checkpoint thread makes the spool files durable in bulk (one `syncfs` of the spool's
filesystem) once the journal has been idle for `IDLE_S` or a segment is full, then deletes
the segments whose files are all made. At start, before the spool is reconciled, `recover`
replays every segment left by a kill or a power cut: each whole record whose file is missing
or differs is written again (durably), and the segment deleted. A record is whole when its
length fits and its CRC matches: a record cut anywhere (an append that never returned, so
never acknowledged) is dropped, and with it nothing after it in the segment, since the
appends before an acknowledgement are all complete.

Segment record: MAGIC, path length (u32), body length (u64), CRC-32 of path and body (u32),
the path (UTF-8, relative to the spool), the body (the file's bytes).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import structlog

from cadnode.core.files import fsync_path, write_durably, write_visible

log = structlog.get_logger("cadnode.ingest.journal")

SUFFIX = ".jnl"
MAGIC = b"CNJ1"
HEADER = struct.Struct("<4sIQI")
# A segment takes appends until it is this long, then a new one starts.
SEGMENT_BYTES = 256 * 2**20
# Larger instances are not journaled (the spool writes their files durably in place): the
# journal saves a flush, a fixed few milliseconds, but writes the bytes twice, which for a
# large instance costs more (an 18 MB DX: 240 ms journaled, 111 ms in place, here).
LARGEST_RECORD = 2**20
# The checkpoint runs when the journal has had no append for this long.
IDLE_S = 0.5

Chunks = Sequence[bytes | bytearray | memoryview]


@dataclass
class _Segment:
    path: Path
    descriptor: int
    end: int = 0  # bytes of whole records
    records: int = 0
    pending: int = 0  # appended, spool file not yet made


class Journal:
    """Appends for one process (each has its own segments), and their checkpoints."""

    def __init__(self, spool: Path, idle_s: float = IDLE_S) -> None:
        self.spool = spool
        self.idle_s = idle_s
        self.folder = journal_folder(spool)
        self._lock = threading.Condition()
        self._active: _Segment | None = None
        self._closed: list[_Segment] = []  # full, or cut off by a checkpoint
        self._last_append = 0.0
        self._stopping = False
        self._draining = False  # a checkpoint waits for spool files being made
        self._checkpointer: threading.Thread | None = None

    def write(self, relative: Path, chunks: Chunks) -> int:
        """Make an instance durable, then its spool file; returns its size in bytes."""
        segment, size = self._append(relative, chunks)
        try:
            os.fdatasync(segment.descriptor)
            write_visible(self.spool / relative, chunks)
        finally:
            with self._lock:
                segment.pending -= 1
                if self._draining and not segment.pending:
                    self._lock.notify_all()
        return size

    def _append(self, relative: Path, chunks: Chunks) -> tuple[_Segment, int]:
        name = str(PurePosixPath(relative)).encode()
        if _relative(name) is None:
            raise ValueError(f"{relative}: outside the spool")
        size = sum(len(chunk) for chunk in chunks)
        crc = zlib.crc32(name)
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
        record = [HEADER.pack(MAGIC, len(name), size, crc), name, *chunks]
        length = HEADER.size + len(name) + size
        with self._lock:
            segment = self._segment_for(length)
            try:
                written = os.writev(segment.descriptor, record)
                if written != length:
                    raise OSError(f"journal: {written} of {length} bytes written")
            except BaseException:
                os.ftruncate(segment.descriptor, segment.end)  # no torn record mid-segment
                raise
            segment.end += length
            segment.records += 1
            segment.pending += 1
            self._last_append = time.monotonic()
            if segment.records == 1:  # the checkpoint thread may sleep with no timeout
                self._lock.notify_all()
        return segment, size

    def _segment_for(self, length: int) -> _Segment:
        active = self._active
        if active is not None and active.end + length > SEGMENT_BYTES and active.records:
            self._closed.append(active)
            active = None
        if active is None:
            active = self._active = self._open_segment()
        if self._checkpointer is None:
            self._checkpointer = threading.Thread(
                target=self._checkpoints, name="journal-checkpoint", daemon=True
            )
            self._checkpointer.start()
        return active

    def _open_segment(self) -> _Segment:
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsync_path(self.folder.parent)
        path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex}{SUFFIX}"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # in use: see `recover` (released if it dies)
        fsync_path(self.folder)  # the segment's name: its records are found after a power cut
        return _Segment(path, descriptor)

    def _checkpoints(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._due():
                    self._lock.wait(self._until_due())
                if self._stopping:
                    return
            self.checkpoint()

    def _due(self) -> bool:
        if self._closed:
            return True
        active = self._active
        idle = time.monotonic() - self._last_append >= self.idle_s
        return active is not None and active.records > 0 and idle

    def _until_due(self) -> float | None:
        """How long the checkpoint thread may sleep: with nothing to checkpoint, until an
        append wakes it (an idle node's thread never runs)."""
        active = self._active
        if active is None or not active.records:
            return None
        return max(0.01, self.idle_s - (time.monotonic() - self._last_append))

    def checkpoint(self) -> int:
        """Make every spool file made so far durable and delete the segments whose files
        are all made; returns how many were deleted."""
        with self._lock:
            if self._active is not None and self._active.records:
                self._closed.append(self._active)
                self._active = None
            self._draining = True
            while any(segment.pending for segment in self._closed):
                self._lock.wait()
            self._draining = False
            retiring, self._closed = self._closed, []
        if not retiring:
            return 0
        sync_filesystem(self.spool)
        for segment in retiring:
            os.close(segment.descriptor)
            segment.path.unlink()
        fsync_path(self.folder)
        log.debug("journal.checkpointed", segments=len(retiring))
        return len(retiring)

    def close(self) -> None:
        """A last checkpoint: a clean stop leaves no segment of this process."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._checkpointer is not None:
            self._checkpointer.join()
        self.checkpoint()
        with self._lock:
            if self._active is not None:  # opened, never written
                os.close(self._active.descriptor)
                self._active.path.unlink(missing_ok=True)
                self._active = None


def recover(spool: Path) -> dict[str, int]:
    """Replay every segment under `spool` (run before any process appends): the spool
    files of whole records made durably where missing or different, then the segments
    deleted. Returns the counts of records replayed, already in place, and dropped (a cut
    tail)."""
    folder = journal_folder(spool)
    counts = {"replayed": 0, "in_place": 0, "dropped_bytes": 0, "in_use": 0}
    segments = sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
    for path in segments:
        with _unless_in_use(path) as data:
            if data is None:  # a live process's (another node's, on a shared spool)
                counts["in_use"] += 1
                continue
            counts = _replay(spool, path, data, counts)
    if segments:
        fsync_path(folder)
        log.info("journal.recovered", segments=len(segments), **counts)
    return counts


@contextlib.contextmanager
def _unless_in_use(path: Path) -> Iterator[bytes | None]:
    """A segment's bytes, locked while they are replayed; None if its writer holds it."""
    descriptor = os.open(path, os.O_RDWR)  # write access: an exclusive lock over NFS needs it
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        with open(descriptor, "rb", closefd=False) as segment:
            yield segment.read()
    finally:
        os.close(descriptor)


def _replay(spool: Path, path: Path, data: bytes, counts: dict[str, int]) -> dict[str, int]:
    """A segment's whole records made durable in the spool, then the segment deleted."""
    end = 0
    for relative, body, after in records(data):
        end = after
        target = spool / relative
        if _same_bytes(target, body):
            counts["in_place"] += 1
            continue
        write_durably(target, [body])
        counts["replayed"] += 1
    counts["dropped_bytes"] += len(data) - end
    path.unlink()
    return counts


def journal_folder(spool: Path) -> Path:
    """Beside the spool, not in it: the spool holds instances' files only."""
    return spool.with_name(f"{spool.name}-journal")


def records(data: bytes) -> Iterator[tuple[Path, memoryview, int]]:
    """The whole records of a segment, in order: (path, body, offset after it); stops at the
    first that is cut short or does not check."""
    view = memoryview(data)
    offset = 0
    while offset + HEADER.size <= len(data):
        magic, name_length, size, crc = HEADER.unpack_from(data, offset)
        start = offset + HEADER.size
        end = start + name_length + size
        if magic != MAGIC or end > len(data):
            return
        name, body = view[start : start + name_length], view[start + name_length : end]
        if zlib.crc32(body, zlib.crc32(name)) != crc:
            return
        relative = _relative(bytes(name))
        if relative is None:
            return
        offset = end
        yield relative, body, offset


def _relative(name: bytes) -> Path | None:
    """A record's path, only if it stays inside the spool."""
    try:
        path = PurePosixPath(name.decode())
    except UnicodeDecodeError:
        return None
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return Path(path)


def _same_bytes(path: Path, body: memoryview) -> bool:
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(body):
            return path.read_bytes() == body
    return False


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def sync_filesystem(folder: Path) -> None:
    """Flush the filesystem that holds `folder` (Linux `syncfs`; elsewhere every one)."""
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        if syncfs(descriptor) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), str(folder))
    finally:
        os.close(descriptor)
