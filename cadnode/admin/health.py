"""Readiness: may this node be sent studies now?

Ready when the database takes a write (a committed round trip, to the very file the node
opened: SQLite goes on writing to a deleted or replaced file as if nothing had happened), the
spool takes a file and has more room than the watermark (`storage.min_free_mb`, below which
C-STORE is refused anyway), and every engine bundle in the engines folder is loaded.
Liveness (/healthz) only says the process serves.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import text

from cadnode.admin.context import AdminContext, file_identity
from cadnode.core.db import Database, utcnow

# One row, rewritten by each readiness check: outside the models, no stage reads it.
_PROBE_TABLE = "CREATE TABLE IF NOT EXISTS readiness_probe (id INTEGER PRIMARY KEY, at TEXT)"
_PROBE_WRITE = (
    "INSERT INTO readiness_probe (id, at) VALUES (1, :at) "
    "ON CONFLICT (id) DO UPDATE SET at = excluded.at"
)
_PROBE_READ = "SELECT at FROM readiness_probe WHERE id = 1"
# /readyz answers anyone: a committed (fsync'ed) write per request would let a flood of probes
# queue writes in front of C-STORE's own commits. One round trip a second answers them all;
# the file checks (a stat) still run on every probe.
ROUND_TRIP_EVERY_S = 1.0
ROUND_TRIP_STALE_S = 10.0
_round_trips: WeakKeyDictionary[Database, float] = WeakKeyDictionary()
_round_trip_lock = threading.Lock()


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def readiness(context: AdminContext) -> dict[str, Any]:
    checks = [_database(context), _spool(context), _engines(context)]
    return {
        "ready": all(check.ok for check in checks),
        "checks": {check.name: {"ok": check.ok, "detail": check.detail} for check in checks},
    }


def _database(context: AdminContext) -> Check:
    file = context.database.file  # None: PostgreSQL, whose files are the server's
    problem = _database_file_problem(file, context.database_file) if file else None
    if problem:
        return Check("database", False, problem)
    try:
        age_s = _recent_round_trip(context.database)
    except Exception as error:  # whatever the driver raises, the answer is "not ready"
        return Check("database", False, f"no write round trip: {type(error).__name__}: {error}")
    return Check("database", True, f"writable: a committed round trip {age_s:.1f} s ago")


def _recent_round_trip(database: Database) -> float:
    """Seconds since the last write round trip that succeeded, making one if it is stale.
    While one is under way, other probes answer from the last rather than queue behind it
    (each waiting probe would hold a request thread)."""
    if not _round_trip_lock.acquire(blocking=False):
        age_s = time.monotonic() - _round_trips.get(database, -float("inf"))
        if age_s > ROUND_TRIP_STALE_S:
            raise TimeoutError(f"none completed in the last {ROUND_TRIP_STALE_S:.0f} s")
        return age_s
    try:
        now = time.monotonic()
        last = _round_trips.get(database)
        if last is None or now - last >= ROUND_TRIP_EVERY_S:
            _write_round_trip(database)
            last = _round_trips[database] = time.monotonic()
        return max(0.0, now - last)
    finally:
        _round_trip_lock.release()


def _database_file_problem(path: Path, opened: tuple[int, int] | None) -> str | None:
    """Why the file at `path` is not the writable database the node opened, if it is not."""
    if not path.exists() and path.parent.is_dir():
        return f"{path} deleted while the node runs (it writes to a file no one will read)"
    identity = file_identity(path)
    if identity is None:
        return f"{path} not reachable"
    if opened is not None and identity != opened:
        return f"{path} replaced while the node runs (it writes to the file it opened)"
    for file in (path, path.with_name(path.name + "-wal")):
        # access() reports the immutable attribute (chattr +i), which even root cannot write.
        if file.exists() and not os.access(file, os.W_OK):
            return f"{file} not writable (read-only or immutable)"
    return None


def _write_round_trip(database: Database) -> None:
    stamp = utcnow().isoformat()
    with database.session() as session:
        session.execute(text(_PROBE_TABLE))
        session.execute(text(_PROBE_WRITE), {"at": stamp})
        session.commit()
        read = session.execute(text(_PROBE_READ)).scalar()
    if read != stamp:
        raise RuntimeError("the row written is not the row read back")


def _spool(context: AdminContext) -> Check:
    storage = context.settings.storage
    spool = storage.spool
    try:
        descriptor, name = tempfile.mkstemp(dir=spool, prefix=".readyz-")
        os.close(descriptor)
        os.unlink(name)
        free_mb = shutil.disk_usage(spool).free / 2**20
    except OSError as error:
        return Check("spool", False, f"{spool} not writable: {error.strerror or error}")
    if free_mb < storage.min_free_mb:
        return Check(
            "spool",
            False,
            f"{free_mb:.0f} MB free, below the {storage.min_free_mb:.0f} MB watermark",
        )
    return Check("spool", True, f"writable, {free_mb:.0f} MB free")


def _engines(context: AdminContext) -> Check:
    loaded = {engine.name for engine in context.engines}
    missing = sorted(set(context.configured_engines) - loaded)
    if missing:
        return Check("engines", False, f"not loaded: {', '.join(missing)}")
    return Check("engines", True, f"{len(loaded)} loaded: {', '.join(sorted(loaded)) or 'none'}")
