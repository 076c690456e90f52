"""Readiness: may this node be sent studies now?

Ready when the database answers, the spool takes a file and has more room than the
watermark (`storage.min_free_mb`, below which C-STORE is refused anyway), and every engine
bundle in the engines folder is loaded. Liveness (/healthz) only says the process serves.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from cadnode.admin.context import AdminContext


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
    try:
        with context.database.session() as session:
            session.execute(text("SELECT 1"))
    except Exception as error:  # whatever the driver raises, the answer is "not ready"
        return Check("database", False, f"not reachable: {type(error).__name__}: {error}")
    return Check("database", True, "reachable")


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
