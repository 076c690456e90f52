"""Schema migrations (cadnode/core/migrations/): the revisions make exactly the models' tables,
and a database of release ed9fd1e (tests/fixtures/release-ed9fd1e/, written by that release's
own code) is recognised, stamped 0001 and upgraded, in one transaction, by one process at a time.
"""

from __future__ import annotations

import argparse
import sqlite3
import tarfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool
from structlog.testing import capture_logs

from cadnode.admin.schema import db_command
from cadnode.core import migrations
from cadnode.core.config import load_settings
from cadnode.core.db import Database
from cadnode.core.migrations.compare import differences, summary

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "release-ed9fd1e" / "var.tar.gz"
NEW_REVISION = '.venv/bin/python -m cadnode.core.migrations revision -m "what changed"'


def release_database(folder: Path) -> Path:
    """The release's database files alone (cadnode.db and its WAL), as the release left them."""
    with tarfile.open(FIXTURE) as archive:
        members = [m for m in archive.getmembers() if Path(m.name).name.startswith("cadnode.db")]
        archive.extractall(folder, members=members, filter="data")
    return folder / "var" / "cadnode.db"


def schema(path: Path) -> dict[str, Any]:
    """Every table's columns (name, type, nullable), keys, constraints and indexes, by name."""
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    try:
        with engine.connect() as connection:
            found = inspect(connection)
            return {
                table: {
                    "columns": [
                        (c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(table)
                    ],
                    "primary key": found.get_pk_constraint(table),
                    # in any order: copying a table (SQLite's ALTER) may reorder them
                    "foreign keys": by_name(found.get_foreign_keys(table)),
                    "unique": by_name(found.get_unique_constraints(table)),
                    "indexes": by_name(found.get_indexes(table)),
                }
                for table in sorted(found.get_table_names())
            }
    finally:
        engine.dispose()


def by_name(items: Sequence[Any]) -> list[Any]:
    return sorted(items, key=lambda item: str(item["name"]))


def rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_the_revisions_make_the_models_tables(tmp_path: Path) -> None:
    path = tmp_path / "cadnode.db"
    migrations.upgrade(path, new_from_models=False)
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    with engine.connect() as connection:
        missing = summary(differences(connection))
    engine.dispose()
    assert not missing, (
        f"cadnode/core/db.py's tables differ from revision {migrations.head()}'s schema: "
        f"write the next revision ({NEW_REVISION}, docs/operations.md). A revision would: "
        + ", ".join(missing)
    )


def test_the_revisions_are_one_numbered_line() -> None:
    scripts = migrations.scripts()
    assert len(scripts.get_heads()) == 1, "two heads: give the newer revision the other as its base"
    chain = [script.revision for script in scripts.walk_revisions()]  # newest first
    assert chain[::-1] == [f"{n:04d}" for n in range(1, len(chain) + 1)]
    assert chain[-1] == migrations.RELEASE_REVISION
    for script in scripts.walk_revisions():
        assert Path(script.path).name.startswith(f"{script.revision}_")


def test_a_release_database_is_recognised_stamped_and_upgraded(tmp_path: Path) -> None:
    path = release_database(tmp_path / "release")
    before = migrations.current(path)
    assert (before.current, before.tables) == (None, 14)  # 14 tables, no revision
    counts = {table: rows(path, table) for table in ("job", "instance", "resultobject", "delivery")}
    assert counts["job"] == 3 and counts["delivery"] == 7

    with capture_logs() as events:
        Database(path)

    assert migrations.current(path).up_to_date
    assert [e["event"] for e in events if e["event"].startswith("db.")] == [
        "db.stamped",
        "db.upgrading",
        "db.upgraded",
    ]
    assert {table: rows(path, table) for table in counts} == counts
    fresh = tmp_path / "fresh.db"
    Database(fresh)  # made from the models
    assert schema(path) == schema(fresh)  # constraint names, indexes and all


def test_an_upgrade_that_fails_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = release_database(tmp_path)
    as_released = schema(path)

    upgrade = migrations.command.upgrade

    def fail_after(settings: Any, revision: str) -> None:  # after the newest revision's DDL
        upgrade(settings, revision)
        if revision == "head":
            raise migrations.SchemaError("failed for the test")

    monkeypatch.setattr(migrations.command, "upgrade", fail_after)
    with pytest.raises(migrations.SchemaError, match="failed for the test"):
        Database(path)
    assert schema(path) == as_released  # no revision table, no new table, constraints unnamed
    assert migrations.current(path).current is None


def test_a_database_of_no_release_is_refused_untouched(tmp_path: Path) -> None:
    path = release_database(tmp_path)
    with sqlite3.connect(path) as connection:
        connection.execute("ALTER TABLE job DROP COLUMN timeline")
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)")
    as_found = schema(path)
    with pytest.raises(migrations.SchemaError) as refused:
        Database(path)
    assert "table job lacks column(s) timeline" in str(refused.value)
    assert "table notes is not the release's" in str(refused.value)
    assert schema(path) == as_found


def test_a_new_database_is_made_from_the_models_at_head(tmp_path: Path) -> None:
    path = tmp_path / "cadnode.db"
    with capture_logs() as events:
        Database(path)
    assert [(e["event"], e["revision"]) for e in events if e["event"].startswith("db.")] == [
        ("db.created", migrations.head())
    ]
    assert migrations.current(path).up_to_date


def test_a_revision_from_a_newer_cadnode_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cadnode.db"
    Database(path)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(migrations.SchemaError, match="9999, which this cadnode does not know"):
        Database(path)


def test_openers_at_once_upgrade_it_once(tmp_path: Path) -> None:
    path = release_database(tmp_path)
    start = threading.Barrier(3)
    failures: list[BaseException] = []

    def open_it() -> None:
        start.wait()
        try:
            Database(path)
        except BaseException as error:
            failures.append(error)

    with capture_logs() as events:
        openers = [threading.Thread(target=open_it) for _ in range(3)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(60)
    assert not failures
    assert [e["event"] for e in events if e["event"].startswith("db.")] == [
        "db.stamped",
        "db.upgrading",
        "db.upgraded",
    ]


def test_db_current_and_upgrade_say_where_the_database_stands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release_database(tmp_path)
    settings = load_settings({"CADNODE_DATA_DIR": str(tmp_path / "var")})
    head = migrations.head()

    assert db_command(settings, argparse.Namespace(db_command="current")) == 1
    assert "no revision recorded (made before migrations" in capsys.readouterr().out
    assert db_command(settings, argparse.Namespace(db_command="upgrade")) == 0
    assert f"upgraded to revision {head} (recorded none: made before migrations)" in (
        capsys.readouterr().out
    )
    assert db_command(settings, argparse.Namespace(db_command="current")) == 0
    assert f"revision {head} (head {head}): up to date" in capsys.readouterr().out
