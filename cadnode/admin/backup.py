"""`cadnode backup`: an online copy of the database and a manifest of the held files; checking
a data dir against a backup, and restoring one into a fresh data dir.

An SQLite database is copied with SQLite's backup API, page-stepped, inside one read transaction
of its own. In WAL mode a reader never blocks the node's writers, and holding the snapshot
keeps every step on the same version of the database: a page-stepped copy without it starts
again each time the node commits, and under steady traffic may never finish. A PostgreSQL
database is dumped with pg_dump and restored with pg_restore (cadnode/admin/backup_postgres.py).

The files (spool, results, answers) are listed after the copy. The node writes each file
before the row that names it, so every row in the copy has its file in the manifest; a file
that arrived after the copy is listed too and, once restored, is indexed by the start-up
reconciliation like any file without a row.

The manifest records each file's size and SHA-256. Files never change once renamed into
place, hashing runs at over a gigabyte a second on one core (reading the files is the cost),
and a modification time does not survive a copy, so it could not tell a faithfully restored
file from a changed one. `--sizes-only` skips the hashing where reading the whole spool
takes too long; verification then checks presence and size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import hashlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import URL

from cadnode import __version__
from cadnode.admin import backup_postgres as postgres
from cadnode.core import audit
from cadnode.core.config import Environment, Settings
from cadnode.core.db import AuditKind, AuditOutcome, Database
from cadnode.core.files import fsync_path, is_temporary, write_durably

log = structlog.get_logger("cadnode.admin.backup")

FORMAT = 1  # of backup.json and files.jsonl; raised when either changes incompatibly
DATABASE_FILE = "cadnode.db"
MANIFEST_FILE = "files.jsonl"
METADATA_FILE = "backup.json"  # written last: a backup without it is incomplete
README_FILE = "README.txt"
COPIES_FOLDER = "files"  # with --copy-files: the files, under their data-dir paths
CONFIG_FOLDER = "config"
HELD_FOLDERS = ("spool", "results", "answers")  # the data dir's folders listed
# Pages copied per step (64 MiB at SQLite's default 4 KiB pages): a progress point between
# steps; the node's writers are not waiting on the copy either way (WAL).
PAGES_PER_STEP = 16384
CHUNK_BYTES = 1 << 20


class BackupError(Exception):
    """A backup, check or restore that cannot go on; the message says why."""


@dataclass(frozen=True)
class HeldFile:
    """One manifest line."""

    path: str  # relative to the data dir, e.g. spool/<study>/<series>/<instance>.dcm
    size: int
    sha256: str | None  # None: listed with --sizes-only

    def line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def parse(cls, line: str) -> HeldFile:
        fields = json.loads(line)
        return cls(path=str(fields["path"]), size=int(fields["size"]), sha256=fields["sha256"])


@dataclass(frozen=True)
class DatabaseCopy:
    bytes: int
    seconds: float
    check: str  # PRAGMA quick_check's first line: "ok" when sound
    schema_revision: str  # Alembic's revision, or "unversioned"


@dataclass
class Listing:
    """What the manifest holds, and the files that went while they were listed."""

    count: int = 0
    bytes: int = 0
    vanished: int = 0  # deleted (retention) between the walk finding them and reading them


# --- taking a backup ---------------------------------------------------------------------


def take(
    settings: Settings,
    config_file: Path,
    target: Path,
    *,
    hashes: bool = True,
    copies: bool = False,
) -> dict[str, Any]:
    """Back the node's data dir up into `target` (absent or empty); returns the metadata."""
    _prepare_empty(target)
    started = time.monotonic()
    database, database_file = _copy_database(settings, target)
    listing = write_manifest(settings.storage.data_dir, target, hashes=hashes, copies=copies)
    metadata = {
        "format": FORMAT,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "cadnode_version": __version__,
        "schema_revision": database.schema_revision,
        "data_dir": str(settings.storage.data_dir),
        "database": {"file": database_file, **asdict(database)},
        "files": {
            "manifest": MANIFEST_FILE,
            "count": listing.count,
            "bytes": listing.bytes,
            "hashes": "sha256" if hashes else "sizes only",
            "copies": COPIES_FOLDER if copies else None,
            "vanished": listing.vanished,
        },
        "config": copy_configuration(settings, config_file, target / CONFIG_FOLDER),
        "environment": sorted(name for name in os.environ if name.startswith("CADNODE_")),
        "seconds": round(time.monotonic() - started, 3),
    }
    write_durably(target / README_FILE, [readme(metadata).encode()])
    write_durably(target / METADATA_FILE, [json.dumps(metadata, indent=2).encode() + b"\n"])
    log.info(
        "backup.written",
        files=listing.count,
        bytes=listing.bytes,
        database_bytes=database.bytes,
        seconds=metadata["seconds"],
    )
    return metadata


def _copy_database(settings: Settings, target: Path) -> tuple[DatabaseCopy, str]:
    """The database into the backup (SQLite's file, or a PostgreSQL dump), and its name."""
    url = settings.database_url
    if url.drivername == "sqlite":
        return copy_database(settings.storage.database, target / DATABASE_FILE), DATABASE_FILE
    size, seconds, check, revision = postgres.dump(url, target / postgres.DUMP_FILE)
    return DatabaseCopy(size, seconds, check, revision), postgres.DUMP_FILE


def _prepare_empty(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise BackupError(f"{folder} exists and is not an empty folder: choose a new one")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # it will hold patient data


def copy_database(
    source: Path,
    target: Path,
    pages_per_step: int = PAGES_PER_STEP,
    on_step: Callable[[int, int], object] | None = None,
) -> DatabaseCopy:
    """A consistent copy of the live database (SQLite's backup API, within one snapshot);
    `on_step` is called after each step with (pages left, pages in all)."""
    if not source.is_file():
        raise BackupError(f"no database at {source}")
    started = time.monotonic()
    # mode=rw: never create an empty database where the node's should be.
    with (
        closing(
            sqlite3.connect(_uri(source, "rw"), uri=True, timeout=30, isolation_level=None)
        ) as reader,
        closing(sqlite3.connect(target)) as copy,
    ):
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot begins
        progress = None if on_step is None else (lambda _, left, total: on_step(left, total))
        reader.backup(copy, pages=pages_per_step, progress=progress)
        reader.execute("ROLLBACK")
        # The copy is one self-contained file (no -wal beside it); the node turns WAL back on
        # when it opens a restored one.
        copy.execute("PRAGMA journal_mode=DELETE")
    fsync_path(target)
    check, revision = inspect_database(target)
    return DatabaseCopy(
        bytes=target.stat().st_size,
        seconds=round(time.monotonic() - started, 3),
        check=check,
        schema_revision=revision,
    )


def inspect_database(path: Path) -> tuple[str, str]:
    """(PRAGMA quick_check's first line, the Alembic revision or "unversioned")."""
    with closing(sqlite3.connect(_uri(path, "ro"), uri=True)) as connection:
        check = str(connection.execute("PRAGMA quick_check").fetchone()[0])
        versioned = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        ).fetchone()
        revisions = "SELECT version_num FROM alembic_version"
        rows = connection.execute(revisions).fetchall() if versioned else []
    return check, ",".join(sorted(str(row[0]) for row in rows)) or "unversioned"


def _uri(path: Path, mode: str) -> str:
    return f"{path.resolve().as_uri()}?mode={mode}"  # a '?' or '#' in the path stays a path


def write_manifest(data_dir: Path, target: Path, *, hashes: bool, copies: bool) -> Listing:
    """List (and hash, and copy) every held file into `target`'s manifest."""
    listing = Listing()
    copies_folder = target / COPIES_FOLDER if copies else None
    with (target / MANIFEST_FILE).open("w") as manifest:
        for relative in held_files(data_dir):
            try:
                entry = describe(data_dir, relative, hashes=hashes, copy_into=copies_folder)
            except FileNotFoundError:
                listing.vanished += 1
                continue
            manifest.write(entry.line() + "\n")
            listing.count += 1
            listing.bytes += entry.size
        manifest.flush()
        os.fsync(manifest.fileno())
    return listing


def held_files(data_dir: Path) -> Iterator[str]:
    """Data-dir-relative paths of the held files, in a stable order, streamed (a spool may
    hold millions); temporaries of writes under way are not files yet."""
    for name in HELD_FOLDERS:
        for folder, subfolders, files in os.walk(data_dir / name):
            subfolders.sort()
            for file in sorted(files):
                path = Path(folder, file)
                if not is_temporary(path) and path.is_file() and not path.is_symlink():
                    yield path.relative_to(data_dir).as_posix()


def describe(data_dir: Path, relative: str, *, hashes: bool, copy_into: Path | None) -> HeldFile:
    """One file's manifest entry, read once for its hash and, if asked, its copy."""
    path = data_dir / relative
    if not hashes and copy_into is None:
        return HeldFile(relative, path.stat().st_size, None)
    digest = hashlib.sha256()
    chunks = _read(path, digest)
    if copy_into is not None:
        size = write_durably(copy_into / relative, chunks)
    else:
        size = sum(len(chunk) for chunk in chunks)
    return HeldFile(relative, size, digest.hexdigest() if hashes else None)


def _read(path: Path, digest: Any) -> Iterator[bytes]:
    with path.open("rb") as handle:  # opened at the first next(): FileNotFoundError there
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            yield chunk


def copy_configuration(settings: Settings, config_file: Path, folder: Path) -> dict[str, str]:
    """The configuration, rules and priority policy files, each by its role."""
    files = {
        "config": config_file,
        "rules": settings.rules,
        "priority_policy": settings.priority.policy_file,
    }
    copied: dict[str, str] = {}
    for role, source in files.items():
        if source.is_file():
            name = source.name if source.name not in copied.values() else f"{role}-{source.name}"
            write_durably(folder / name, [source.read_bytes()])
            copied[role] = name
    return {role: f"{CONFIG_FOLDER}/{name}" for role, name in copied.items()}


def readme(metadata: dict[str, Any]) -> str:
    files = metadata["files"]
    where = (
        f"their copies are in {COPIES_FOLDER}/"
        if files["copies"]
        else "copy them from the data dir (or your file backup) with --files-from"
    )
    return (
        f"cadnode backup, {metadata['created_at']}\n"
        f"cadnode {metadata['cadnode_version']}, schema {metadata['schema_revision']}\n"
        f"from the data dir {metadata['data_dir']}\n\n"
        f"{DATABASE_FILE:<13} the database, a consistent copy (SQLite's backup API)\n"
        f"{MANIFEST_FILE:<13} {files['count']} held files ({files['bytes']} bytes): path, size, "
        f"{files['hashes']}; {where}\n"
        f"{CONFIG_FOLDER + '/':<13} the configuration, rules and priority policy in force\n"
        f"{METADATA_FILE:<13} this, as JSON; written last: without it the backup is incomplete\n\n"
        "Restore (docs/operations.md, 'Backup and restore'): stop the node, then\n"
        "  cadnode backup restore THIS-FOLDER --data-dir NEW-EMPTY-DATA-DIR "
        "[--files-from OLD-DATA-DIR]\n"
        "  cadnode backup verify THIS-FOLDER --data-dir NEW-EMPTY-DATA-DIR\n"
        "and start the node on the new data dir.\n"
    )


# --- checking and restoring --------------------------------------------------------------


def read_metadata(backup: Path) -> dict[str, Any]:
    try:
        metadata: dict[str, Any] = json.loads((backup / METADATA_FILE).read_text())
    except FileNotFoundError:
        raise BackupError(f"{backup} is not a complete backup: it has no {METADATA_FILE}") from None
    except ValueError as error:
        raise BackupError(f"{backup / METADATA_FILE} does not read as JSON: {error}") from None
    if metadata.get("format") != FORMAT:
        raise BackupError(f"{backup}: backup format {metadata.get('format')!r}, not {FORMAT}")
    return metadata


def manifest(backup: Path) -> Iterator[HeldFile]:
    with (backup / MANIFEST_FILE).open() as lines:
        for number, line in enumerate(lines, 1):
            try:
                yield HeldFile.parse(line)
            except (ValueError, KeyError, TypeError) as error:
                raise BackupError(
                    f"{MANIFEST_FILE}:{number}: not a manifest line ({error})"
                ) from None


def mismatch(path: Path, entry: HeldFile) -> str | None:
    """Why `path` is not the file `entry` describes, or None when it is."""
    try:
        if entry.sha256 is None:
            return _differs(entry, path.stat().st_size, None)
        digest = hashlib.sha256()
        size = sum(len(chunk) for chunk in _read(path, digest))
    except FileNotFoundError:
        return f"missing: {entry.path}"
    return _differs(entry, size, digest.hexdigest())


def _differs(entry: HeldFile, size: int, sha256: str | None) -> str | None:
    if size != entry.size:
        return f"changed: {entry.path} ({size} bytes, the manifest says {entry.size})"
    if entry.sha256 is not None and sha256 != entry.sha256:
        return f"changed: {entry.path} (its SHA-256 differs from the manifest's)"
    return None


def verify(backup: Path, files_in: Path) -> list[str]:
    """Every problem with the backup's database copy and with the files under `files_in`
    (a data dir, or the backup's own copies) against the manifest."""
    metadata = read_metadata(backup)
    problems = _database_problems(backup / metadata["database"]["file"])
    listed = set()
    for entry in manifest(backup):
        listed.add(entry.path)
        if problem := mismatch(files_in / entry.path, entry):
            problems.append(problem)
    if extra := sum(1 for path in held_files(files_in) if path not in listed):
        print(f"note: {extra} file(s) under {files_in} are not in the manifest (newer than it)")
    return problems


def _database_problems(path: Path) -> list[str]:
    if path.name == postgres.DUMP_FILE:
        check = postgres.dump_check(path)
        return [] if check == "ok" else [f"the database dump fails its check: {check}"]
    if not path.is_file():
        return [f"missing: the database copy {path}"]
    try:
        check, _ = inspect_database(path)
    except sqlite3.Error as error:
        return [f"the database copy does not open: {error}"]
    return [] if check == "ok" else [f"the database copy fails its check: {check}"]


def restore(
    backup: Path, data_dir: Path, files_from: Path | None, database_url: URL | None = None
) -> list[str]:
    """Copy the backup into `data_dir` (absent or empty): its database (a PostgreSQL dump into
    the empty database at `database_url`), and each manifest file from the backup's copies or
    `files_from`, checked as it is copied; the problems found."""
    metadata = read_metadata(backup)
    dumped = metadata["database"]["file"] == postgres.DUMP_FILE
    if dumped and (database_url is None or database_url.drivername == "sqlite"):
        raise BackupError(
            f"{backup} holds a PostgreSQL dump: give the node an empty PostgreSQL database "
            "(database.url or CADNODE_DATABASE_URL) to restore it into"
        )
    source = backup / COPIES_FOLDER if metadata["files"]["copies"] else files_from
    if source is None and metadata["files"]["count"]:
        raise BackupError(
            f"{backup} holds no copies of the files: name where they are with --files-from"
        )
    if problems := _database_problems(backup / metadata["database"]["file"]):
        return problems
    _prepare_empty(data_dir)
    if dumped:
        assert database_url is not None
        postgres.load(backup / postgres.DUMP_FILE, database_url)
    else:
        with (backup / DATABASE_FILE).open("rb") as database:
            write_durably(data_dir / DATABASE_FILE, iter(lambda: database.read(CHUNK_BYTES), b""))
    problems = []
    for entry in manifest(backup):
        if source is not None and (problem := _restore_file(source, data_dir, entry)):
            problems.append(problem)
    return problems


def _restore_file(source: Path, data_dir: Path, entry: HeldFile) -> str | None:
    """Copy one file, hashing it on the way; a copy that is not the manifest's is removed."""
    digest = hashlib.sha256()
    try:
        size = write_durably(data_dir / entry.path, _read(source / entry.path, digest))
    except FileNotFoundError:
        return f"missing: {entry.path}"
    problem = _differs(entry, size, digest.hexdigest())
    if problem:
        (data_dir / entry.path).unlink()
    return problem


# --- the command -------------------------------------------------------------------------

USAGE = """cadnode backup DIR [--sizes-only] [--copy-files]
       cadnode backup verify DIR [--data-dir DATA_DIR]
       cadnode backup restore DIR --data-dir NEW_DATA_DIR [--files-from OLD_DATA_DIR]"""
ACTIONS = ("verify", "restore")


def add_backup_command(commands: Any) -> None:
    backup = commands.add_parser(
        "backup",
        usage=USAGE,
        help="copy the database online and list the held files; verify; restore",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    backup.add_argument("words", nargs="+", metavar="[verify|restore] DIR")
    backup.add_argument(
        "--sizes-only", action="store_true", help="list sizes without hashing every file"
    )
    backup.add_argument(
        "--copy-files", action="store_true", help="copy the held files into DIR/files/ too"
    )
    backup.add_argument(
        "--data-dir",
        type=Path,
        help="verify: check this data dir's files; restore: the new, empty data dir",
    )
    backup.add_argument(
        "--files-from",
        type=Path,
        help="restore: where the held files are, "
        "when the backup holds no copies (the old data dir, a file backup)",
    )


def backup_command(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when done without a problem, 1 otherwise (each problem on stderr)."""
    action, folder = _parse_words(args.words)
    try:
        if action == "verify":
            return _report(verify(folder, _files_to_verify(settings, folder, args.data_dir)))
        if action == "restore":
            if args.data_dir is None:
                raise BackupError("restore needs --data-dir: the new, empty data dir")
            restored = restore(folder, args.data_dir, args.files_from, settings.database_url)
            return _report(restored, restored=True)
        return _take_and_report(settings, folder, args)
    except (BackupError, postgres.DumpError, OSError, sqlite3.Error) as error:
        print(f"backup: {error}", file=sys.stderr)
        return 1


def _parse_words(words: list[str]) -> tuple[str, Path]:
    if len(words) == 1:
        if words[0] in ACTIONS:
            raise SystemExit(
                f"cadnode backup {words[0]}: name the backup folder (DIR); "
                f"to back up into a folder named {words[0]}, write ./{words[0]}"
            )
        return "take", Path(words[0])
    if len(words) == 2 and words[0] in ACTIONS:
        return words[0], Path(words[1])
    raise SystemExit(f"usage: {USAGE}")


def _files_to_verify(settings: Settings, backup: Path, data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir
    copies = backup / COPIES_FOLDER
    return copies if copies.is_dir() else settings.storage.data_dir


def _take_and_report(settings: Settings, target: Path, args: argparse.Namespace) -> int:
    config_file = Environment.read(os.environ).config
    metadata = take(
        settings, config_file, target, hashes=not args.sizes_only, copies=args.copy_files
    )
    database, files = metadata["database"], metadata["files"]
    print(f"backup of {metadata['data_dir']} in {target}: {metadata['seconds']} s")
    print(
        f"  database: {database['bytes']} bytes in {database['seconds']} s, "
        f"check {database['check']}, schema {metadata['schema_revision']}"
    )
    print(
        f"  files: {files['count']} ({files['bytes']} bytes), {files['hashes']}"
        + (", copied" if files["copies"] else "")
        + (f"; {files['vanished']} deleted while listed" if files["vanished"] else "")
    )
    print(f"  config: {', '.join(metadata['config'].values())}")
    _audit(settings, target, files["count"], files["bytes"] + database["bytes"])
    return 0 if database["check"] == "ok" else 1


def _audit(settings: Settings, target: Path, files: int, size: int) -> None:
    """Like every audit event, never a reason to fail the work it records."""
    try:
        trail = Database(settings.database_url)
    except Exception as error:
        print(f"note: the backup is whole; its audit event was not recorded: {error}")
        return
    audit.record(
        trail,
        AuditKind.admin_backup,
        actor=f"cli:{getpass.getuser()}",
        outcome=AuditOutcome.ok,
        target=str(target.resolve()),
        files=files,
        bytes=size,
    )


def _report(problems: Iterable[str], *, restored: bool = False) -> int:
    found = list(problems)
    for problem in found:
        print(problem, file=sys.stderr)
    verdict = "restored" if restored else "verified"
    print(f"{verdict}: {len(found)} problem(s)" if found else f"{verdict}: OK")
    return 1 if found else 0
