"""Which version of each engine is live and which run in shadow: the release table.

Several versions of an engine may be installed at once (any folders under `engines/` whose
manifests share a name; cadnode.infer.bundle.discover_versions). The table
(cadnode.core.db.EngineRelease) gives a version a role: live (its answers are the results),
shadow (it runs on the live version's inputs, after all live work, and its answers are kept
apart, never delivered or shown as results) or retired (installed, not run). With no row
for an engine, its highest installed version is live; the node records that at its first
start with the engine, so a higher version installed later does not go live by itself.

Route reads the table when it routes a job and writes the versions into the job's
pipeline: a promotion holds for jobs routed from then on, on every node, without a restart,
and no job runs twice. A rule's step may pin its own (`version:`, `shadow:`), which then
wins over the table.

Every change (promote, rollback, shadow, retire) is one transaction with its audit event:
all of it or none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from cadnode.core.audit import aware
from cadnode.core.db import (
    AuditEvent,
    AuditKind,
    AuditOutcome,
    Database,
    EngineRelease,
    ReleaseRole,
    utcnow,
)
from cadnode.infer.bundle import version_order

log = structlog.get_logger("cadnode.infer.releases")

INSTALLED = "installed"  # the role shown for a version with no row and not live by default


class ReleaseError(ValueError):
    """A change the table refuses (an unknown version, nothing to roll back to, ...)."""


@dataclass(frozen=True)
class Release:
    """What runs of one engine now: the live version and the shadow versions."""

    name: str
    live: str | None
    shadows: tuple[str, ...] = ()


def resolve(session: Session, name: str, installed: Sequence[str]) -> Release:
    """The live and shadow versions of `name` among its `installed` versions."""
    rows = _rows(session, name)
    return _release(name, rows, installed)


def roles(session: Session, name: str, installed: Sequence[str]) -> dict[str, str]:
    """Each installed version's role, for `cadnode engines list` and the dashboard."""
    release = resolve(session, name, installed)
    rows = _rows(session, name)
    shown = {}
    for version in installed:
        if version == release.live:
            shown[version] = ReleaseRole.live.value
        elif version in release.shadows:
            shown[version] = ReleaseRole.shadow.value
        elif version in rows and rows[version].role is ReleaseRole.retired:
            shown[version] = ReleaseRole.retired.value
        else:
            shown[version] = INSTALLED
    return shown


def record_defaults(database: Database, installed: Mapping[str, Sequence[str]]) -> None:
    """At start: for an engine with no row yet, record its default live version, so that a
    higher version installed later waits for an admin instead of going live by itself."""
    for name, versions in installed.items():
        try:
            with database.session() as session:
                if _rows(session, name):
                    continue
                release = _release(name, {}, versions)
                if release.live is None:
                    continue
                session.add(_row(name, release.live, ReleaseRole.live, "node"))
                session.commit()
                log.info("engine.release_recorded", engine=name, live=release.live)
        except IntegrityError:  # another process recorded it first: theirs stands
            continue


def promote(
    database: Database,
    name: str,
    version: str,
    installed: Sequence[str],
    *,
    retire: bool = False,
    actor: str = "cli",
    action: str = "promote",
) -> Release:
    """Make `version` live; the live one before it becomes shadow (retired with `retire`).
    `action`: what the audit event calls the change."""
    with database.session() as session:
        rows = _rows(session, name)
        before = _release(name, rows, installed)
        _check_installed(name, version, installed)
        if version == before.live:
            raise ReleaseError(f"{name} {version} is live already")
        now = utcnow()
        # The live one, and any stale live row of a version no longer installed.
        stale = [v for v, row in rows.items() if row.role is ReleaseRole.live]
        for old in {*stale, *([before.live] if before.live else [])} - {version}:
            _set(session, rows, name, old, _demoted(retire), actor).live_until = now
        _set(session, rows, name, version, ReleaseRole.live, actor)
        return _commit(session, name, installed, action, before, actor)


def rollback(
    database: Database,
    name: str,
    installed: Sequence[str],
    *,
    retire: bool = False,
    actor: str = "cli",
) -> Release:
    """Put back the version that was live before the live one (`rollback_target`)."""
    previous = rollback_target(database, name, installed)
    return promote(
        database, name, previous, installed, retire=retire, actor=actor, action="rollback"
    )


def rollback_target(database: Database, name: str, installed: Sequence[str]) -> str:
    """The latest version to stop being live, if still installed (ReleaseError if none)."""
    with database.session() as session:
        rows = _rows(session, name)
        live = _release(name, rows, installed).live
    earlier = [
        row
        for row in rows.values()
        if row.live_until is not None and row.version in installed and row.version != live
    ]
    if not earlier:
        raise ReleaseError(f"{name}: no earlier live version installed to roll back to")
    return max(earlier, key=lambda row: aware(row.live_until or utcnow())).version


def set_role(
    database: Database,
    name: str,
    version: str,
    role: ReleaseRole,
    installed: Sequence[str],
    *,
    actor: str = "cli",
) -> Release:
    """Put a version in shadow, or retire it (`cadnode engines shadow | retire`). The live
    version changes only by promote or rollback, except the default one (nothing recorded
    yet, e.g. both versions installed before the first start): the next highest is then live."""
    if role is ReleaseRole.live:
        raise ReleaseError("a version goes live by `cadnode engines promote`")
    with database.session() as session:
        rows = _rows(session, name)
        before = _release(name, rows, installed)
        _check_installed(name, version, installed)
        if version in rows and rows[version].role is ReleaseRole.live:
            raise ReleaseError(
                f"{name} {version} is live: promote another version first "
                f"(`cadnode engines promote {name} VERSION`)"
            )
        _set(session, rows, name, version, role, actor)
        live = _release(name, rows, installed).live
        if live is None or live == version:
            raise ReleaseError(f"{name} {version} is the only version that could be live")
        _set(session, rows, name, live, ReleaseRole.live, actor)  # recorded: it stays live
        return _commit(session, name, installed, role.value, before, actor)


# --- inside a change ---------------------------------------------------------------------------


def _commit(
    session: Session,
    name: str,
    installed: Sequence[str],
    action: str,
    before: Release,
    actor: str,
) -> Release:
    """Check the table's one invariant, audit the change in the same transaction, commit."""
    session.flush()
    after = _release(name, _rows(session, name), installed)
    live_rows = [row for row in _rows(session, name).values() if row.role is ReleaseRole.live]
    if len(live_rows) != 1:  # a concurrent change got in between: nothing of this one holds
        session.rollback()
        raise ReleaseError(f"{name}: changed meanwhile by someone else; look again and retry")
    session.add(
        AuditEvent(
            kind=AuditKind.admin_engine_release,
            actor=actor,
            outcome=AuditOutcome.ok,
            details={
                "engine": name,
                "action": action,
                "live_before": before.live,
                "shadow_before": list(before.shadows),
                "live": after.live,
                "shadow": list(after.shadows),
            },
        )
    )
    session.commit()
    log.info(
        "engine.release_changed",
        engine=name,
        action=action,
        actor=actor,
        live=after.live,
        live_before=before.live,
        shadow=list(after.shadows),
    )
    return after


def _set(
    session: Session,
    rows: dict[str, EngineRelease],
    name: str,
    version: str,
    role: ReleaseRole,
    actor: str,
) -> EngineRelease:
    row = rows.get(version)
    if row is None:
        row = rows[version] = _row(name, version, role, actor)
    row.role, row.changed_at, row.changed_by = role, utcnow(), actor
    session.add(row)
    return row


def _row(name: str, version: str, role: ReleaseRole, actor: str) -> EngineRelease:
    return EngineRelease(name=name, version=version, role=role, changed_by=actor)


def _demoted(retire: bool) -> ReleaseRole:
    return ReleaseRole.retired if retire else ReleaseRole.shadow


# --- reading the table -------------------------------------------------------------------------


def _rows(session: Session, name: str) -> dict[str, EngineRelease]:
    found = session.exec(select(EngineRelease).where(EngineRelease.name == name))
    return {row.version: row for row in found}


def _release(name: str, rows: Mapping[str, EngineRelease], installed: Sequence[str]) -> Release:
    """Live: the version recorded live, if installed; else the highest installed version not
    recorded shadow or retired; else the highest installed. Shadow: installed versions
    recorded shadow, but the live one."""
    recorded_live = [v for v in installed if v in rows and rows[v].role is ReleaseRole.live]
    unassigned = [v for v in installed if v not in rows]
    candidates = recorded_live or unassigned or list(installed)
    live = max(candidates, key=version_order) if candidates else None
    shadows = tuple(
        sorted(
            (
                v
                for v in installed
                if v != live and v in rows and rows[v].role is ReleaseRole.shadow
            ),
            key=version_order,
        )
    )
    return Release(name, live, shadows)


def _check_installed(name: str, version: str, installed: Sequence[str]) -> None:
    if version not in installed:
        shown = ", ".join(sorted(installed, key=version_order)) or "none"
        raise ReleaseError(f"{name} {version} is not installed (installed: {shown})")
