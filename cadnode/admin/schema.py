"""`cadnode db current` and `cadnode db upgrade`: the database's schema revision, and bringing it
to this cadnode's (which `cadnode serve` also does at every start)."""

from __future__ import annotations

import argparse
from typing import Any

from cadnode.core import connection, migrations
from cadnode.core.config import Settings


def add_db_commands(commands: Any) -> None:
    db = commands.add_parser("db", help="the database schema: its revision, upgrades")
    actions = db.add_subparsers(dest="db_command", required=True)
    actions.add_parser(
        "current", help="the database's schema revision and this cadnode's; exit 1 if they differ"
    )
    actions.add_parser(
        "upgrade", help="bring the database to this cadnode's schema (serve does it at start)"
    )


def db_command(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when the database is (now) at this cadnode's revision, 1 when it is not."""
    url = settings.database_url
    shown = connection.sqlite_file(url) or connection.shown(url)
    if args.db_command == "upgrade":
        before = migrations.current(url)
        after = migrations.upgrade(url)
        print(f"database {shown}: {_upgraded(before, after)}")
        return 0
    standing = migrations.current(url)
    print(f"database {shown}: {describe(standing)}")
    return 0 if standing.up_to_date else 1


def describe(standing: migrations.Revisions) -> str:
    head = standing.head
    if standing.up_to_date:
        return f"revision {head} (head {head}): up to date"
    if standing.tables == 0:
        return f"no tables yet; serve or `cadnode db upgrade` makes revision {head}'s"
    if standing.current is None:
        return (
            "no revision recorded (made before migrations, by release ed9fd1e?); "
            f"`cadnode db upgrade` recognises it and upgrades it to {head}"
        )
    if not migrations.known(standing.current):
        return (
            f"revision {standing.current}, which this cadnode does not know (head {head}): "
            "a newer cadnode upgraded it"
        )
    return f"revision {standing.current} (head {head}): `cadnode db upgrade` upgrades it"


def _upgraded(before: migrations.Revisions, after: migrations.Revisions) -> str:
    if before.up_to_date:
        return f"revision {after.current}: up to date, nothing to do"
    if before.current is None:
        made = "recorded none: made before migrations" if before.tables else "a new database"
        return f"upgraded to revision {after.current} ({made})"
    return f"upgraded to revision {after.current} (from {before.current})"
