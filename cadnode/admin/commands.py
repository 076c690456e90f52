"""The admin's terminal commands: `cadnode status`, `cadnode audit`, `cadnode hash-password`."""

from __future__ import annotations

import argparse
import getpass
import json
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any

from cadnode.core import audit
from cadnode.core.claims import describe, processes
from cadnode.core.config import HttpSettings, Settings
from cadnode.core.db import Database

COMMANDS = ("status", "audit", "hash-password")


def add_admin_commands(commands: Any) -> None:
    commands.add_parser(
        "status",
        help="ask the running node whether it is ready (its /readyz; exit 1 if not), and list "
        "every node sharing its database: processes, associations, leases",
    )
    trail = commands.add_parser("audit", help="the audit trail as JSON lines, oldest first")
    trail.add_argument(
        "--since", default="24h", help="an ISO 8601 time or a duration back (90m, 24h, 7d)"
    )
    trail.add_argument("--kind", help="only this kind, or kinds under it (e.g. admin)")
    commands.add_parser(
        "hash-password",
        help="read a password (or token) and print its hash for http.admin_password_hash",
    )


def admin_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "status":
        ready = show_status(settings.http)
        show_nodes(settings)
        return ready
    try:
        since = audit.parse_since(args.since)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    for event in audit.events(Database(settings.database_url), since, args.kind):
        print(audit.as_json_line(event))
    return 0


def hash_password_command() -> int:
    """Prompted twice on a terminal; read from the first line of stdin otherwise (scripts)."""
    from cadnode.admin.auth import hash_password  # the web stack, only for this command

    if sys.stdin.isatty():
        password = getpass.getpass("admin password: ")
        if getpass.getpass("again: ") != password:
            print("the two passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("a password of at least 8 characters, please", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def readyz_url(http: HttpSettings) -> str:
    """The node's own /readyz, on loopback when it listens on every address."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(http.bind, http.bind)
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if http.tls else "http"
    return f"{scheme}://{host}:{http.port}/readyz"


def show_nodes(settings: Settings) -> None:
    """Every node's processes, as their heartbeats in the shared database say."""
    try:
        with Database(settings.database_url).session() as session:
            seen = processes(session, settings.node)
    except Exception as error:  # the database unreachable: readiness said what it could
        print(f"nodes: the database cannot be read: {type(error).__name__}")
        return
    print("nodes sharing the database:" if seen else "nodes: none has written a heartbeat")
    for process in seen:
        print(f"  {describe(process)}")


def show_status(http: HttpSettings) -> int:
    url = readyz_url(http)
    # Our own node, by the address in our own config: its certificate need not name it.
    context = ssl._create_unverified_context() if http.tls else None
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            report = json.loads(response.read())
    except urllib.error.HTTPError as error:  # 503: answered, not ready
        report = json.loads(error.read())
    except (OSError, ValueError) as error:
        print(f"cadnode is not answering at {url}: {error}")
        return 1
    verdict = "ready" if report["ready"] else "NOT READY"
    print(f"cadnode at {url.removesuffix('/readyz')}: {verdict}")
    for name, check in report["checks"].items():
        print(f"  {name:<9} {'ok' if check['ok'] else 'FAIL':<5} {check['detail']}")
    return 0 if report["ready"] else 1
