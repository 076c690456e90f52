"""Where the database is, and how to connect to it: SQLite (the embedded default, a file under
the data dir) or PostgreSQL (for state shared by several processes or nodes).

The one place that knows the two apart at the connection level: which URLs are accepted, each
engine's settings (SQLite's pragmas; PostgreSQL's pool, isolation and time zone), and the few
SQL constructs whose spelling differs (`Wildcard`). Everything else speaks SQLAlchemy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import URL, ColumnElement, Engine, Enum, bindparam, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import Boolean

SQLITE, POSTGRESQL = "sqlite", "postgresql"
# The drivers cadnode is tested with: the standard library's sqlite3, and psycopg 3.
DRIVERS = {"sqlite": SQLITE, "sqlite+pysqlite": SQLITE, "postgresql+psycopg": POSTGRESQL}
# Per process: the stages' threads and the associations' share these (a connection is held
# only for a transaction). Several nodes and receivers each hold their own: size PostgreSQL's
# max_connections for all of them (docs/operations.md).
POOL_SIZE, POOL_OVERFLOW, POOL_TIMEOUT_S = 5, 10, 30
CONNECT_TIMEOUT_S = 10


# SQLSTATEs of a transaction PostgreSQL gave up on only because of another one at the same
# time (serialization_failure, deadlock_detected): the same transaction again may well pass.
_TRANSIENT = {"40001", "40P01"}
TRANSIENT_TRIES = 5


def transient(error: BaseException) -> bool:
    """Whether `error` (SQLAlchemy's, or the driver's own) aborted a transaction only for a
    concurrent one: a deadlock or a serialization failure, worth running it again."""
    cause = getattr(error, "orig", None) or error
    return getattr(cause, "sqlstate", None) in _TRANSIENT


def parse(text: str | URL) -> URL:
    """An accepted database URL; ValueError naming what is wrong (never the password)."""
    try:
        url = text if isinstance(text, URL) else make_url(text)
    except ArgumentError:
        raise ValueError("not a database URL (expected DIALECT+DRIVER://...)") from None
    if url.drivername not in DRIVERS:
        accepted = "sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DATABASE"
        raise ValueError(f"unsupported database {url.drivername!r}: expected {accepted}")
    if DRIVERS[url.drivername] == SQLITE and not url.database:
        raise ValueError("an SQLite URL needs a file: sqlite:///PATH (in memory cannot be shared)")
    if DRIVERS[url.drivername] == POSTGRESQL and not url.database:
        raise ValueError("a PostgreSQL URL needs a database name: .../DATABASE")
    return url


def of(path_or_url: Path | str | URL) -> URL:
    """A path is an SQLite file; anything else a URL."""
    if isinstance(path_or_url, Path):
        return URL.create("sqlite", database=str(path_or_url))
    return parse(path_or_url)


def kind(url: URL) -> str:
    """SQLITE or POSTGRESQL."""
    return DRIVERS[url.drivername]


def sqlite_file(url: URL) -> Path | None:
    """The SQLite database's file; None on PostgreSQL."""
    return Path(str(url.database)) if kind(url) == SQLITE else None


def shown(url: URL) -> str:
    """The URL as logs and messages may show it: the password masked."""
    return url.render_as_string(hide_password=True)


def engine(url: URL, *, pooled: bool = True, **sqlite_args: Any) -> Engine:
    """An engine for `url`: SQLite as a file, with `sqlite_args` for its driver; PostgreSQL
    with a bounded pool that drops dead connections, READ COMMITTED, and UTC as the session's
    time zone (so SQL working on times, the tallies' triggers, sees what Python wrote)."""
    pool: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    if kind(url) == SQLITE:
        file = sqlite_file(url)
        assert file is not None
        file.parent.mkdir(parents=True, exist_ok=True)
        return create_engine(url, connect_args={"timeout": 30, **sqlite_args}, **pool)
    if pooled:
        pool = {
            "pool_size": POOL_SIZE,
            "max_overflow": POOL_OVERFLOW,
            "pool_timeout": POOL_TIMEOUT_S,
            "pool_pre_ping": True,  # a server restart or an idle timeout: reconnect, not fail
        }
    made = create_engine(
        url,
        isolation_level="READ COMMITTED",
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "options": "-c timezone=UTC"},
        **pool,
    )
    # Stored enums are their members' names in text columns, as on SQLite: a native ENUM
    # type would need an ALTER TYPE revision for every member added, which autogenerate
    # never writes (and the revisions made on SQLite never would).
    made.dialect.supports_native_enum = False
    return made


def on_connect(made: Engine, prepare: Any) -> None:
    """Run `prepare(dbapi_connection, record)` on each new connection (SQLite's pragmas)."""
    event.listen(made, "connect", prepare)


def insert_new(model: Any, dialect_name: str) -> Any:
    """INSERT of rows whose key is not there yet, the others skipped (ON CONFLICT DO NOTHING,
    which both spell alike; SQLAlchemy has a construct per dialect)."""
    dialect = postgresql if dialect_name == POSTGRESQL else sqlite
    return dialect.insert(model).on_conflict_do_nothing()


@compiles(Enum, POSTGRESQL)
def _enum_as_text(_type: Enum, _compiler: Any, **_: Any) -> str:
    # Unbounded, as SQLite treats it: a member longer than the revision's VARCHAR(n) knew
    # would otherwise be refused on PostgreSQL only (the revisions are compared on SQLite).
    return "VARCHAR"


class Wildcard(ColumnElement[bool]):
    """`column` matches a DICOM wildcard pattern (`*`, `?`; case-sensitive): SQLite's GLOB,
    PostgreSQL's LIKE with its own special characters escaped."""

    type = Boolean()
    inherit_cache = False

    def __init__(self, column: Any, pattern: str) -> None:
        self.column = column
        self.pattern = pattern


@compiles(Wildcard, SQLITE)
def _glob(element: Wildcard, compiler: SQLCompiler, **kw: Any) -> str:
    # GLOB's only special character besides * and ?, [, made to stand for itself.
    pattern: BindParameter[str] = bindparam(None, element.pattern.replace("[", "[[]"), unique=True)
    return f"{compiler.process(element.column, **kw)} GLOB {compiler.process(pattern, **kw)}"


@compiles(Wildcard, POSTGRESQL)
def _like(element: Wildcard, compiler: SQLCompiler, **kw: Any) -> str:
    escaped = "".join("\\" + c if c in "\\%_" else c for c in element.pattern)
    pattern: BindParameter[str] = bindparam(
        None, escaped.replace("*", "%").replace("?", "_"), unique=True
    )
    column = compiler.process(element.column, **kw)
    return f"{column} LIKE {compiler.process(pattern, **kw)} ESCAPE '\\'"
