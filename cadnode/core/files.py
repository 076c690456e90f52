"""Durable files: written under a temporary name, fsynced, renamed into place.

A reader (or a restart) sees either the whole file or none of it; after `write_durably`
returns, the bytes and the directory entry survive a crash or a power cut.
"""

from __future__ import annotations

import os
import re
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

    Through the page cache: the device writes it later, in bulk (the journal's checkpoint).
    Direct I/O (rounds 4 to 6) made the writer wait for the device, and on the VM of round 7
    that wait cost more than the page cache's pages (docs/benchmarks.md).
    """
    try:
        return _write_temporary(path, chunks, sync=False)
    except FileNotFoundError:  # its folder is new (one look per series, not per instance)
        path.parent.mkdir(parents=True, exist_ok=True)
        return _write_temporary(path, chunks, sync=False)


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
    handle = temporary.open("xb")  # outside the try: a name taken is not ours to remove
    try:
        with handle:
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
    # 64 random bits, opened with O_EXCL: a clash fails, never shares (uuid4 cost 3x more).
    return path.with_name(f".{path.name}.{os.urandom(8).hex()}{TEMPORARY_SUFFIX}")


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
