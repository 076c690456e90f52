"""The database schema's history: Alembic revisions (`versions/`) over the SQLModel tables of
cadnode/core/db.py.

Every `Database` brings its database to this code's head revision as it opens it: the node at
start, each receiver process, each command. The first to find work takes the schema lock (on
SQLite `<data dir>/locks/schema.lock` and the database's write lock; on PostgreSQL an advisory
lock held by the upgrade's transaction, so it spans nodes) and applies every pending revision
in one transaction: a kill leaves the database at its old revision, never between two. The
others wait on the lock and then find the work done. A new database is made from the models
and stamped head (Alembic's recipe); tests/test_migrations.py checks that the revisions make
the very same schema.

Release ed9fd1e made its tables with `create_all` and kept no revision: a database without
one whose tables and columns are that release's is stamped `RELEASE_REVISION` (0001, that
schema), then upgraded. Developers add a revision with `python -m cadnode.core.migrations
revision -m "what changed"` (docs/operations.md, "Upgrading").
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import URL, Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from cadnode.core import connection as databases

log = structlog.get_logger("cadnode.db")

SCRIPTS = Path(__file__).resolve().parent
RELEASE_REVISION = "0001"  # the schema of release ed9fd1e, made by create_all, unversioned
VERSION_TABLE = "alembic_version"
# PostgreSQL's advisory lock key for upgrading the schema (any fixed number: "cadn" in ASCII).
SCHEMA_LOCK_KEY = 0x6361646E


class SchemaError(Exception):
    """The database cannot be brought to this code's schema; the message says why and what to do."""


@dataclass(frozen=True)
class Revisions:
    """Where a database stands: its revision (None: none recorded) and this code's head."""

    current: str | None
    head: str
    tables: int  # how many tables it holds, the version table aside (0: a new database)

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, without an alembic.ini: the scripts are in this package."""
    settings = Config()
    settings.set_main_option("script_location", str(SCRIPTS))
    settings.attributes["connection"] = connection
    return settings


@functools.cache
def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())


def head() -> str:
    """This code's schema revision (one line of history: two heads are a developer's error)."""
    revision = scripts().get_current_head()
    if revision is None:
        raise SchemaError(f"no migration revisions in {SCRIPTS / 'versions'}")
    return revision


def current(where: Path | str | URL) -> Revisions:
    """Where the database at `where` (an SQLite file's path, or a URL) stands, read without
    changing it."""
    url = databases.of(where)
    file = databases.sqlite_file(url)
    if file is not None and not file.exists():
        return Revisions(current=None, head=head(), tables=0)
    engine = databases.engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            return _revisions(connection)
    except SQLAlchemyError as error:  # not a database, or unreadable
        raise SchemaError(f"cannot read the database's schema: {error}") from error
    finally:
        engine.dispose()


def upgrade(where: Path | str | URL, *, new_from_models: bool = True) -> Revisions:
    """Bring the database at `where` (an SQLite file, made here if absent; or a URL) to this
    code's head revision.

    `new_from_models=False` makes a new database by running every revision instead (what
    autogenerate compares the models with, and what the tests check against them)."""
    url = databases.of(where)
    standing = current(url)
    if standing.up_to_date:
        return standing  # the common case: no lock taken, nothing written
    _known(standing)
    file = databases.sqlite_file(url)
    engine = _writer(file) if file is not None else databases.engine(url, pooled=False)
    try:
        with _schema_lock(file), engine.begin() as connection:
            if file is None:  # PostgreSQL: one upgrader at a time, across nodes too
                connection.execute(text(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})"))
            return _upgrade(connection, new_from_models)
    except SQLAlchemyError as error:  # a revision failed: its transaction rolled back
        raise SchemaError(
            f"upgrading the schema from revision {standing.current or 'none'} to "
            f"{standing.head} failed, and changed nothing: {error}"
        ) from error
    finally:
        engine.dispose()


def _upgrade(connection: Connection, new_from_models: bool) -> Revisions:
    standing = _revisions(connection)  # again, now alone: another process may have done it
    if standing.up_to_date:
        return standing
    _known(standing)
    if new_from_models and standing.current is None and not standing.tables:
        return _create(connection)
    dangling = _dangling_references(connection)
    if standing.current is None and standing.tables:
        if connection.dialect.name != databases.SQLITE:
            raise SchemaError(
                "the database holds tables but records no schema revision: it is not one "
                "cadnode made. Give cadnode an empty database"
            )
        _recognise_release(connection)
        _adopt_release(connection)
        MigrationContext.configure(connection).stamp(scripts(), RELEASE_REVISION)
        log.info("db.stamped", revision=RELEASE_REVISION, reason="made before migrations")
    log.info("db.upgrading", previous=standing.current or "none", revision=standing.head)
    command.upgrade(config(connection), "head")
    if (broken := _dangling_references(connection)) > dangling:
        raise SchemaError(
            f"the upgrade would leave {broken - dangling} more row(s) referring to rows that "
            "are not there; nothing was changed"
        )
    upgraded = _revisions(connection)
    log.info("db.upgraded", previous=standing.current or "none", revision=upgraded.current)
    return upgraded


def _create(connection: Connection) -> Revisions:
    from cadnode.core.migrations.compare import models

    models().create_all(connection)
    MigrationContext.configure(connection).stamp(scripts(), "head")
    made = _revisions(connection)
    log.info("db.created", revision=made.current)
    return made


def _revisions(connection: Connection) -> Revisions:
    tables = set(inspect(connection).get_table_names()) - {VERSION_TABLE}
    recorded = MigrationContext.configure(connection).get_current_heads()
    if len(recorded) > 1:
        raise SchemaError(f"the database records several revisions ({', '.join(recorded)})")
    return Revisions(current=recorded[0] if recorded else None, head=head(), tables=len(tables))


def known(revision: str) -> bool:
    """Whether `revision` is one of this code's (one it lacks was made by a newer cadnode)."""
    try:
        scripts().get_revision(revision)
    except CommandError:
        return False
    return True


def _known(standing: Revisions) -> None:
    if standing.current is not None and not known(standing.current):
        raise SchemaError(
            f"the database is at schema revision {standing.current}, which this cadnode does "
            f"not know (its newest is {standing.head}): a newer cadnode upgraded it. Run that "
            "version, or restore the backup taken before the upgrade"
        )


def _recognise_release(connection: Connection) -> None:
    """An unversioned database must hold exactly release ed9fd1e's tables and columns."""
    found = _columns(connection)
    problems = [
        f"table {table} is missing" for table in sorted(_release_columns().keys() - found.keys())
    ]
    problems += [
        f"table {table} is not the release's"
        for table in sorted(found.keys() - _release_columns().keys())
    ]
    for table in sorted(found.keys() & _release_columns().keys()):
        if missing := sorted(_release_columns()[table] - found[table]):
            problems.append(f"table {table} lacks column(s) {', '.join(missing)}")
        if extra := sorted(found[table] - _release_columns()[table]):
            problems.append(f"table {table} has column(s) {', '.join(extra)} the release lacks")
    if problems:
        raise SchemaError(
            "the database records no schema revision and is not release ed9fd1e's (the one "
            f"release made before migrations): {'; '.join(problems)}. It was made by an "
            "unreleased cadnode: restore a backup, or move it aside to start afresh"
        )


def _adopt_release(connection: Connection) -> None:
    """Make the release's tables exactly revision 0001's: create_all left their constraints
    unnamed, and a later revision can only drop or alter a constraint it can name. Each table
    is copied under its constraints' conventional names (SQLite's only way to rename them)."""
    from cadnode.core.db import NAMING_CONVENTION  # imported by now: it imports this package

    operations = Operations(MigrationContext.configure(connection))
    for table in sorted(_release_columns()):
        with operations.batch_alter_table(
            table, recreate="always", naming_convention=NAMING_CONVENTION
        ):
            pass


@functools.cache
def _release_columns() -> dict[str, frozenset[str]]:
    """Each table of revision 0001 and its columns, made in memory by the revision itself."""
    engine = create_engine("sqlite://", poolclass=NullPool)
    with engine.begin() as connection:
        command.upgrade(config(connection), RELEASE_REVISION)
        return {table: frozenset(columns) for table, columns in _columns(connection).items()}


def _columns(connection: Connection) -> dict[str, frozenset[str]]:
    schema = inspect(connection)
    return {
        table: frozenset(column["name"] for column in schema.get_columns(table))
        for table in schema.get_table_names()
        if table != VERSION_TABLE
    }


def _dangling_references(connection: Connection) -> int:
    """Rows referring to rows that are not there. Foreign keys go unchecked while revisions
    copy tables (SQLite's ALTER), so the upgrade counts them before and after instead.
    PostgreSQL checks every foreign key as the revisions run: none to count there."""
    if connection.dialect.name != databases.SQLITE:
        return 0
    return len(connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall())


def _writer(path: Path) -> Engine:
    """An engine whose transactions are SQLite's own (BEGIN IMMEDIATE: the write lock at once),
    so DDL commits with the rest, and whose connections check no foreign keys while a revision
    copies a table (SQLite's way to ALTER it) that others refer to."""
    engine = databases.engine(databases.of(path), pooled=False)
    event.listen(engine, "connect", _migration_pragmas)
    event.listen(engine, "begin", _begin_immediate)
    return engine


def _migration_pragmas(connection: Any, _record: Any) -> None:
    connection.isolation_level = None  # the driver's own BEGINs off: ours (below) instead
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=OFF")  # counted instead (_dangling_references)
    # A copied table is renamed into place; SQLite's own RENAME would first check every
    # trigger, and fail on one naming the table while it is away. Triggers on a copied table
    # go with it: Database installs them again after every upgrade (cadnode/core/tallies.py).
    cursor.execute("PRAGMA legacy_alter_table=ON")
    cursor.close()


def _begin_immediate(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def _schema_lock(path: Path | None) -> Iterator[None]:
    """One upgrader of an SQLite file at a time across processes (`flock`: the kernel drops
    it if we die). None (PostgreSQL): the upgrade's transaction takes an advisory lock."""
    if path is None:
        yield
        return
    folder = path.parent / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / "schema.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing drops the lock
