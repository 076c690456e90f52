"""`cadnode storage`: what the node holds, per kind, and (`--dry-run`) what the retention
policy would remove now, per kind and reason, by the very selection a pass makes. Nothing
is deleted by either."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from cadnode.core.config import RetentionSettings, StorageSettings
from cadnode.core.db import (
    AuditEvent,
    Database,
    Delivery,
    Instance,
    Job,
    Pin,
    Removal,
    Result,
    ResultObject,
    Study,
    utcnow,
)
from cadnode.retain.policy import (
    DISK_KINDS,
    STUDY_KINDS,
    Candidate,
    Kind,
    Reason,
    deletable,
    unsent,
)
from cadnode.retain.policy import max_age as age_of
from cadnode.retain.removal import plan
from cadnode.retain.stage import DiskGauge, DiskUse, measure_disk, old_audit_events

PLAN_STUDIES = 200  # studies planned at once by the dry run


@dataclass(frozen=True)
class Held:
    """What the node holds of one kind."""

    kind: str  # images, results, answers, database, audit
    objects: int
    bytes: int | None  # None: not measured (rows inside the database file)
    where: str


@dataclass
class Removable:
    """What the policy would remove now, of one kind for one reason."""

    kind: str
    reason: str
    studies: int = 0
    objects: int = 0
    bytes: int = 0


def holdings(database: Database, storage: StorageSettings) -> list[Held]:
    with database.session() as session:
        images, image_bytes = session.exec(
            select(func.count(), func.coalesce(func.sum(Instance.size), 0))
        ).one()
        results = _count(session, ResultObject)
        answers = _count(session, Result)
        jobs = _count(session, Job)
        events = _count(session, AuditEvent)
    return [
        Held("images", images, image_bytes, "spool/ (Instance rows)"),
        Held("results", results, _folder_bytes(storage.results), "results/"),
        Held("answers", answers, _folder_bytes(storage.answers), "answers/ (Result rows)"),
        Held("database", jobs, *_database_bytes(database)),
        Held("audit", events, None, "audit events (rows)"),
    ]


def _database_bytes(database: Database) -> tuple[int, str]:
    """The database's size, and what it is (SQLite: its files; PostgreSQL: the server's)."""
    file = database.file
    if file is None:
        with database.session() as session:
            size = session.exec(select(func.pg_database_size(func.current_database()))).one()
        return int(size), f"PostgreSQL database {database.url.database} (jobs)"
    files = [file, *(Path(f"{file}{end}") for end in ("-wal", "-shm"))]
    return sum(_size(f) for f in files), f"{file.name} (jobs)"


def _count(session: Session, model: Any) -> int:
    return int(session.exec(select(func.count()).select_from(model)).one())


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(folder):
        total += sum(_size(Path(dirpath, name)) for name in names)
    return total


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def would_remove(
    database: Database,
    storage: StorageSettings,
    settings: RetentionSettings,
    *,
    disk: DiskGauge = measure_disk,
    now: dt.datetime | None = None,
) -> list[Removable]:
    """The removals a pass would make now, totalled per kind and reason; deletes nothing."""
    moment = now or utcnow()
    totals: dict[tuple[str, str], Removable] = {}
    seen: set[tuple[int, Kind]] = set()  # (study, kind) counted once, as a pass removes once
    with database.session() as session:
        for kind in STUDY_KINDS:
            age = age_of(settings, kind)
            if age is not None:
                found = deletable(session, kind, older_than=moment - age, limit=None)
                _add(session, storage, kind, Reason.age, found, totals, seen, budget=None)
        if settings.audit is not None:
            events = len(session.exec(old_audit_events(moment - settings.audit, None)).all())
            if events:
                totals[("audit", "age")] = Removable("audit", "age", 0, events, 0)
        _add_disk(session, storage, settings, disk(storage.data_dir), totals, seen)
    return list(totals.values())


def _add_disk(
    session: Session,
    storage: StorageSettings,
    settings: RetentionSettings,
    use: DiskUse,
    totals: dict[tuple[str, str], Removable],
    seen: set[tuple[int, Kind]],
) -> None:
    """Above the high-water mark: the oldest deletable files, until the low-water mark."""
    if use.percent <= settings.high_water_percent:
        return
    freed_by_age = sum(r.bytes for r in totals.values())
    budget = use.above(settings.low_water_percent) - freed_by_age
    for kind in DISK_KINDS:
        if budget <= 0:
            return
        found = deletable(session, kind, older_than=None, limit=None)
        budget = _add(session, storage, kind, Reason.disk, found, totals, seen, budget=budget)


def _add(
    session: Session,
    storage: StorageSettings,
    kind: Kind,
    reason: Reason,
    found: list[Candidate],
    totals: dict[tuple[str, str], Removable],
    seen: set[tuple[int, Kind]],
    *,
    budget: int | None,
) -> int:
    """Count what removing `kind` of `found` takes, study by study, while `budget` bytes
    (None: no limit) remain to be freed; the budget left."""
    left = budget if budget is not None else 0
    for chunk in _chunks(found):
        made = plan(session, storage, kind, reason, chunk)
        for study in chunk:
            if budget is not None and left <= 0:
                return left
            for each, amount in made.removed.get(study.study_uid, {}).items():
                if (study.study_id, each) in seen:
                    continue
                seen.add((study.study_id, each))
                row = totals.setdefault((each.value, reason.value), Removable(each, reason))
                row.studies += 1
                row.objects += amount.objects
                row.bytes += amount.bytes
                left -= amount.bytes
    return left


def _chunks(found: list[Candidate]) -> Iterator[list[Candidate]]:
    for start in range(0, len(found), PLAN_STUDIES):
        yield found[start : start + PLAN_STUDIES]


def report(
    database: Database,
    storage: StorageSettings,
    settings: RetentionSettings,
    *,
    dry_run: bool,
    disk: DiskGauge = measure_disk,
) -> dict[str, Any]:
    """`cadnode storage`'s facts, as one JSON-ready document."""
    use = disk(storage.data_dir)
    with database.session() as session:
        pinned = _count(session, Pin)
        pending = _count(session, Removal)
        studies = _count(session, Study)
        waiting = session.exec(select(func.count()).select_from(Delivery).where(unsent())).one()
    document: dict[str, Any] = {
        "data_dir": str(storage.data_dir),
        "held": [asdict(held) for held in holdings(database, storage)],
        "studies": studies,
        "pinned_studies": pinned,
        "unsent_deliveries": int(waiting),
        "removals_unfinished": pending,
        "disk": {
            "used_percent": round(use.percent, 1),
            "used_bytes": use.used,
            "available_bytes": use.available,
            "high_water_percent": settings.high_water_percent,
            "low_water_percent": settings.low_water_percent,
        },
        "policy": policy_text(settings),
    }
    if dry_run:
        document["would_remove"] = [
            asdict(r) for r in would_remove(database, storage, settings, disk=lambda _: use)
        ]
    return document


def policy_text(settings: RetentionSettings) -> dict[str, str]:
    return {kind.value: duration_text(age_of(settings, kind)) for kind in Kind}


def duration_text(age: dt.timedelta | None) -> str:
    """The age as the configuration would write it: 30d, 12h, 90m, 45s; never."""
    if age is None:
        return "never"
    seconds = age.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def as_text(document: dict[str, Any]) -> str:
    lines = [f"data dir {document['data_dir']}", ""]
    lines.append(f"{'KIND':<10} {'OBJECTS':>10} {'BYTES':>12}  WHERE")
    for held in document["held"]:
        size = "-" if held["bytes"] is None else human_bytes(held["bytes"])
        lines.append(f"{held['kind']:<10} {held['objects']:>10} {size:>12}  {held['where']}")
    disk = document["disk"]
    lines += [
        "",
        f"disk: {disk['used_percent']}% used, {human_bytes(disk['available_bytes'])} free "
        f"(high-water {disk['high_water_percent']}%, low-water {disk['low_water_percent']}%)",
        f"studies {document['studies']}, pinned {document['pinned_studies']}, "
        f"unsent deliveries {document['unsent_deliveries']}, "
        f"removals unfinished {document['removals_unfinished']}",
        "kept: " + ", ".join(f"{kind} {age}" for kind, age in document["policy"].items()),
    ]
    if "would_remove" in document:
        lines += ["", "dry run: the policy would remove now (nothing was deleted)"]
        rows = document["would_remove"]
        if not rows:
            lines.append("  nothing")
        else:
            lines.append(f"{'KIND':<10} {'REASON':<6} {'STUDIES':>8} {'OBJECTS':>10} {'BYTES':>12}")
        for row in rows:
            lines.append(
                f"{row['kind']:<10} {row['reason']:<6} {row['studies']:>8} {row['objects']:>10} "
                f"{human_bytes(row['bytes']):>12}"
            )
    return "\n".join(lines)


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
