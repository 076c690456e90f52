"""`cadnode backup` of a PostgreSQL database: PostgreSQL's own tools, as its admins use them.

`pg_dump --format=custom` takes one consistent snapshot while the nodes keep writing (a
repeatable-read transaction of its own); `pg_restore --list` reads the dump back whole, which
is the dump's check; `pg_restore --single-transaction` loads it into an empty database, all
or nothing. The tools of the newest PostgreSQL installed are used (a pg_dump older than the
server refuses to dump it). The password, if the URL has one, goes to them in the
environment, never on a command line another user could read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from sqlalchemy import URL, create_engine, inspect
from sqlalchemy.pool import NullPool

from cadnode.core.migrations import current

DUMP_FILE = "cadnode.pgdump"
INSTALLED = Path("/usr/lib/postgresql")


class DumpError(Exception):
    """pg_dump or pg_restore could not do its part; the message says why."""


def dump(url: URL, target: Path) -> tuple[int, float, str, str]:
    """(bytes, seconds, check, schema revision) of a dump of the database at `url`."""
    started = time.monotonic()
    _run("pg_dump", "--format=custom", f"--file={target}", "--no-password", url=url)
    seconds = round(time.monotonic() - started, 3)
    with target.open("rb") as written:
        os.fsync(written.fileno())
    revision = current(url).current or "unversioned"
    return target.stat().st_size, seconds, dump_check(target), revision


def dump_check(path: Path) -> str:
    """"ok" when pg_restore reads the dump's table of contents, else why not."""
    if not path.is_file():
        return f"missing: the database dump {path}"
    try:
        _run("pg_restore", "--list", str(path))
    except DumpError as error:
        return str(error)
    return "ok"


def load(path: Path, url: URL) -> None:
    """Restore the dump into the database at `url`, which must hold no tables."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            if tables := inspect(connection).get_table_names():
                raise DumpError(
                    f"the database {url.database} holds {len(tables)} table(s): restore into "
                    "an empty database (createdb, docs/operations.md 'PostgreSQL')"
                )
    finally:
        engine.dispose()
    _run(
        "pg_restore",
        "--single-transaction",
        "--exit-on-error",
        "--no-owner",
        "--no-password",
        f"--dbname={_libpq(url)}",
        str(path),
        url=url,
    )


def _run(tool: str, *arguments: str, url: URL | None = None) -> None:
    command = [_tool(tool), *arguments]
    if url is not None and tool == "pg_dump":
        command.append(_libpq(url))
    environment = dict(os.environ)
    if url is not None and url.password:
        environment["PGPASSWORD"] = str(url.password)
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        raise DumpError(f"{tool} failed: {said[-1] if said else f'exit {done.returncode}'}")


def _libpq(url: URL) -> str:
    """The URL as libpq reads it: no driver name, no password (that goes in PGPASSWORD)."""
    return url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)


def _tool(name: str) -> str:
    versions = sorted(
        (folder for folder in INSTALLED.glob("*/bin") if (folder / name).is_file()),
        key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0,
    )
    if versions:
        return str(versions[-1] / name)
    found = shutil.which(name)
    if found is None:
        raise DumpError(f"{name} is not installed (Debian: apt-get install postgresql-client)")
    return found
