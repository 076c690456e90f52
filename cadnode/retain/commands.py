"""Housekeeping's terminal commands: `cadnode storage [--dry-run]`, `cadnode pin`,
`cadnode unpin`. They act on the database the running node uses (like `cadnode deliveries`)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from cadnode.core.config import Settings
from cadnode.core.db import Database
from cadnode.retain import pins, usage

COMMANDS = ("storage", "pin", "unpin")


def add_retain_commands(commands: Any) -> None:
    storage = commands.add_parser(
        "storage", help="what the node holds per kind; --dry-run: what retention would remove"
    )
    storage.add_argument(
        "--dry-run",
        action="store_true",
        help="also what the retention policy would remove now, per kind and reason (no deletion)",
    )
    storage.add_argument("--json", action="store_true", help="one JSON document")
    pin = commands.add_parser(
        "pin", help="keep a study from housekeeping (no UID: list the pinned studies)"
    )
    pin.add_argument("study_uid", nargs="?", metavar="STUDY_UID")
    pin.add_argument("--reason", help="why it is kept (in the audit trail)")
    unpin = commands.add_parser("unpin", help="let housekeeping remove a pinned study again")
    unpin.add_argument("study_uid", metavar="STUDY_UID")


def retain_command(settings: Settings, args: argparse.Namespace) -> int:
    database = Database(settings.database_url)
    if args.command == "storage":
        document = usage.report(
            database, settings.storage, settings.retention, dry_run=args.dry_run
        )
        print(json.dumps(document, indent=2) if args.json else usage.as_text(document))
        return 0
    if args.command == "pin" and args.study_uid is None:
        for kept in pins.pins(database):
            why = f"  {kept.reason}" if kept.reason else ""
            print(f"{kept.study_uid}  {kept.pinned_at:%Y-%m-%d %H:%M}  {kept.pinned_by}{why}")
        return 0
    actor = f"cli:{getpass.getuser()}"
    if args.command == "pin":
        outcome = pins.pin(database, args.study_uid, actor, args.reason)
    else:
        outcome = pins.unpin(database, args.study_uid, actor)
    print(outcome.line(), file=sys.stdout if outcome.done else sys.stderr)
    return 0 if outcome.done else 1
