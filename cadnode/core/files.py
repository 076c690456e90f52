"""Durable files: written under a temporary name, fsynced, renamed into place.

A reader (or a restart) sees either the whole file or none of it; after `write_durably`
returns, the bytes and the directory entry survive a crash or a power cut.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

# UIDs become path components, so they must be what PS3.5 allows and nothing else:
# a hostile "../" in a SOP Instance UID must never escape the spool. (pydicom's
# `UID.is_valid` is not used: its re.match lets a trailing newline through, and building a
# UID from a hostile value logs a warning quoting it.)
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


# What `write_durably` leaves behind only if the process dies mid-write: never acknowledged.
TEMPORARY_SUFFIX = ".part"


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def write_durably(path: Path, chunks: Iterable[bytes | bytearray | memoryview]) -> int:
    """Write `chunks` to `path` atomically and durably; returns the number of bytes."""
    make_folders_durably(path.parent)
    size = _write_then_rename(path, chunks, sync=True)
    fsync_path(path.parent)
    return size


def write_aside(path: Path, chunks: Sequence[bytes | bytearray | memoryview]) -> tuple[Path, int]:
    """Write `chunks` beside `path` under a temporary name, without flushing them: for a file
    whose bytes are durable elsewhere (the spool's journal, cadnode/ingest/journal.py), put
    in place by the caller with `os.replace` (a reader sees the whole file or none).
    Returns the temporary's path and the number of bytes.

    Up to `DIRECT_LARGEST` bytes go around the page cache (direct I/O) where the filesystem
    allows it: such a file is read again later if at all, and on the VMs this was measured
    on a new page-cache page costs more than the device write (a 525 KB file: 1.3 ms
    buffered, 0.6 ms direct; a receiver taking a CT study 15% faster).
    """
    try:
        return _write_aside(path, chunks)
    except FileNotFoundError:  # its folder is new (one look per series, not per instance)
        path.parent.mkdir(parents=True, exist_ok=True)
        return _write_aside(path, chunks)


# Direct I/O wants its buffer, offset and length aligned to the device's logical block
# (512 or 4096 bytes): the file's whole blocks go direct from an aligned buffer, its tail
# through the page cache.
DIRECT_ALIGNMENT = 4096
DIRECT_LARGEST = 4 * 2**20  # larger files are written through the page cache
_aligned = threading.local()  # each thread's buffer, reused: a new one's pages cost too


def _write_aside(path: Path, chunks: Sequence[bytes | bytearray | memoryview]) -> tuple[Path, int]:
    size = sum(len(chunk) for chunk in chunks)
    direct = getattr(os, "O_DIRECT", 0)
    if not direct or size > DIRECT_LARGEST:
        return _write_temporary(path, chunks, sync=False)
    temporary = _temporary_name(path)
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | direct, 0o644)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        temporary.unlink(missing_ok=True)  # a filesystem without direct I/O (older tmpfs)
        return _write_temporary(path, chunks, sync=False)
    try:
        _write_direct(descriptor, chunks, size)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(descriptor)
    return temporary, size


def _write_direct(
    descriptor: int, chunks: Sequence[bytes | bytearray | memoryview], size: int
) -> None:
    buffer = _aligned_buffer(size)
    at = 0
    for chunk in chunks:
        buffer[at : at + len(chunk)] = chunk
        at += len(chunk)
    whole = size - size % DIRECT_ALIGNMENT
    with memoryview(buffer) as view:
        _write_at(descriptor, view[:whole], 0)
        if size > whole:  # the tail, through the page cache
            flags = fcntl.fcntl(descriptor, fcntl.F_GETFL)
            fcntl.fcntl(descriptor, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            _write_at(descriptor, view[whole:size], whole)


def _aligned_buffer(size: int) -> mmap.mmap:
    """This thread's page-aligned buffer, at least `size` bytes."""
    buffer: mmap.mmap | None = getattr(_aligned, "buffer", None)
    if buffer is None or len(buffer) < size:
        steps = -(-max(size, 1) // 2**20)  # whole MiB: grown rarely
        buffer = _aligned.buffer = mmap.mmap(-1, steps * 2**20)
    return buffer


def _write_at(descriptor: int, data: memoryview, offset: int) -> None:
    if not data:
        return
    written = os.pwrite(descriptor, data, offset)
    if written != len(data):  # direct I/O cannot go on from an unaligned offset
        raise OSError(errno.EIO, f"{written} of {len(data)} bytes written")


def _write_then_rename(
    path: Path, chunks: Iterable[bytes | bytearray | memoryview], sync: bool
) -> int:
    temporary, size = _write_temporary(path, chunks, sync)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return size


def _write_temporary(
    path: Path, chunks: Iterable[bytes | bytearray | memoryview], sync: bool
) -> tuple[Path, int]:
    temporary = _temporary_name(path)
    size = 0
    try:
        with temporary.open("wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                size += len(chunk)
            handle.flush()
            if sync:
                # fdatasync: the data and what reading it back needs (size, block map),
                # without the timestamps a full fsync also flushes; the name: the caller.
                os.fdatasync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary, size


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}")


def make_folders_durably(folder: Path) -> None:
    """`mkdir -p` whose new entries survive a power cut: each new folder's parent is fsynced."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)  # exist_ok: another thread may create it at the same moment
        fsync_path(new.parent)


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (a name made or removed), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
