"""How Alembic compares the models with a database, for `revision`, `check` and the tests
alike (env.py configures every command with these)."""

from __future__ import annotations

from typing import Any, Literal

from alembic.autogenerate import compare_metadata
from alembic.autogenerate.api import AutogenContext
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, MetaData, String, TypeDecorator
from sqlalchemy.types import TypeEngine
from sqlmodel import SQLModel


def models() -> MetaData:
    """Every table of cadnode/core/db.py (imported here: that module imports this package)."""
    import cadnode.core.db  # noqa: F401

    return SQLModel.metadata


def differences(connection: Connection) -> list[Any]:
    """What a revision would have to change to make the database's schema the models' (none:
    no revision is missing). Alembic's diff tuples, e.g. ("add_column", None, "job", Column)."""
    context = MigrationContext.configure(connection, opts={"compare_type": compare_type})
    return list(compare_metadata(context, models()))


def summary(found: list[Any]) -> list[str]:
    """Alembic's diff tuples in a few words each: "add_column job.indexed_at", "add_table alert"."""
    return [_words(difference) for difference in found]


def _words(difference: Any) -> str:
    if isinstance(difference, list):  # a column's changes (type, nullability, ...) together
        return "; ".join(_words(part) for part in difference)
    kind, *parts = difference
    if kind in ("add_column", "remove_column"):
        return f"{kind} {parts[1]}.{parts[2].name}"
    if kind.startswith("modify_"):
        return f"{kind} {parts[1]}.{parts[2]}: {parts[-2]!r} -> {parts[-1]!r}"
    named = parts[0]
    table = getattr(named, "table", None)
    where = f" on {table.name}" if table is not None and table is not named else ""
    return f"{kind} {getattr(named, 'name', named)}{where}"


def compare_type(
    _context: Any,
    _inspected_column: Any,
    _metadata_column: Any,
    inspected_type: TypeEngine[Any],
    metadata_type: TypeEngine[Any],
) -> bool | None:
    """Text is text to SQLite whatever its declared length: a stored enum gaining a longer
    member needs no revision. Anything else: Alembic's own comparison."""
    if _is_text(inspected_type) and _is_text(metadata_type):
        return False
    return None


def _is_text(kind: TypeEngine[Any]) -> bool:
    return isinstance(kind.impl if isinstance(kind, TypeDecorator) else kind, String)


def render_item(kind: str, item: Any, _autogen: AutogenContext) -> str | Literal[False]:
    """SQLModel's column types (AutoString, UTCDateTime) as the SQLAlchemy types they store
    as: a revision then needs only SQLAlchemy, and keeps working whatever SQLModel becomes."""
    if kind == "type" and isinstance(item, TypeDecorator) and _from_sqlmodel(item):
        return f"sa.{item.impl!r}"
    return False


def _from_sqlmodel(kind: TypeEngine[Any]) -> bool:
    return type(kind).__module__.split(".")[0] == "sqlmodel"
