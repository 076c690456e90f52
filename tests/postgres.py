"""A real PostgreSQL server for the tests: the Debian package's `initdb` and `pg_ctl`, in a
temporary folder, on a free loopback port, run by an unprivileged user (PostgreSQL refuses to
run as root: under root the `postgres` system user runs it, else the current user).

Each test gets its own empty database (`fresh_database`): CREATE DATABASE copies template1,
a few milliseconds, so no test sees another's rows.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.dicom_validation import require_tool
from tests.peers import free_port

SUPERUSER = "cadnode"  # the role initdb makes; trust on loopback only (see _start)


@dataclass
class PostgresServer:
    port: int
    folder: Path
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str = "postgres") -> str:
        """An SQLAlchemy URL for `database`, as `database.url` / CADNODE_DATABASE_URL take it."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=database, autocommit=True
        )

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        with self.connect() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self.connect() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _binary(name: str) -> str:
    """A server binary: on PATH, else the newest under /usr/lib/postgresql/*/bin (Debian)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3])
    )
    if versions:
        return str(versions[-1])
    return require_tool(name)  # skips (or fails under CI) with the reason


def _as_owner(argv: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *argv] if owner else argv


@contextmanager
def run_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the duration of the block, stopped (fast) at its end."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    owner = "postgres" if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="cadnode-postgres-"))
    data = folder / "data"
    if owner:
        user = pwd.getpwnam(owner)
        os.chown(folder, user.pw_uid, user.pw_gid)
    port = free_port()
    subprocess.run(
        _as_owner(
            [
                initdb,
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            owner,
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} "
        "-c fsync=on -c max_connections=200 -c shared_buffers=32MB"
    )
    log = folder / "server.log"
    start = [pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
    subprocess.run(_as_owner(start, owner), check=True, capture_output=True, timeout=90)
    try:
        yield PostgresServer(port=port, folder=folder)
    finally:
        stop = [pg_ctl, "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"]
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(_as_owner(stop, owner), capture_output=True, timeout=90, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def fresh_database(server: PostgresServer) -> Iterator[str]:
    """An empty database's URL for the block, dropped after it."""
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)
