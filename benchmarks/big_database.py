"""A million jobs: /metrics and a study-level C-FIND, against the same on an empty database.

The database is generated directly in SQLite (INSERT ... SELECT over recursive CTEs, not
through the stages): 1,000,000 studies and jobs (most delivered, a few failed or still
encoded, each with its timeline), 10,000,000 received instances and as many query index
records, a study index row, an engine answer and a delivery per job, and 1,000,000
association audit events; 5 studies per patient. It is made at this code's schema by
`Database` itself (tables, indexes, triggers), the rows written with the triggers and the
secondary indexes off, the indexes then rebuilt, and opened once more through `Database`,
which finds its triggers missing and recounts every metric tally from the rows (what an
upgrade does). It is kept under benchmarks/out/ and reused while this code's schema and the
generator are the same (`--rebuild` makes it afresh).

Then, in the same run, on it and on an empty database of the same schema: a /metrics scrape
(`cadnode.admin.metrics.render`, as GET /metrics serves it) and a Study Root C-FIND at
STUDY level on one Patient ID (`cadnode.serve.query.find`, what the C-FIND handler runs,
without the network), asking the keys a viewer asks. Each is timed cold (the first, after
opening) and warm (median of `--repeat`), and printed with its ratio to the empty database's.

    .venv/bin/python benchmarks/big_database.py [--jobs 1000000] [--per-job 10] [--rebuild]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog
from pydicom import Dataset
from sqlalchemy import Enum as SqlEnum
from sqlalchemy import Integer, Numeric
from sqlalchemy.sql.sqltypes import Boolean, Float
from sqlmodel import SQLModel

from cadnode.admin import metrics
from cadnode.admin.context import AdminContext
from cadnode.core.config import Settings
from cadnode.core.db import Database
from cadnode.serve.index import QueryIndex
from cadnode.serve.query import STUDY_ROOT, checked, find

OUT = Path(__file__).resolve().parent / "out" / "big_database"
GENERATOR = 2  # bump whenever what `generate` writes changes
# The benchmark's UIDs: ROOT.kind.job[.instance], short so the rows are written fast.
ROOT = "2.25.1234"
PATIENTS_EVERY = 5  # studies per patient
T0 = "2026-01-01 00:00:00"
BIG_TABLES = (
    "study",
    "job",
    "instance",
    "queryrecord",
    "querystudy",
    "result",
    "delivery",
    "auditevent",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--per-job", type=int, default=10, help="instances per job (1-89)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true", help="generate even if cached")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    folder: Path = args.out / f"{args.jobs}x{args.per_job}"
    stamp = _stamp(args.jobs, args.per_job)
    if args.rebuild or _stamp_of(folder) != stamp:
        _build(folder, args.jobs, args.per_job, stamp)
    else:
        print(f"reusing {folder} ({_size_gb(folder):.1f} GB)")
    patient = _patient_id(args.jobs // 2, args.jobs)
    with tempfile.TemporaryDirectory(prefix="cadnode-empty-") as empty:
        _measure(Path(empty) / "warm-up", patient, 1)  # Python's own first-time costs
        figures = {
            "empty": _measure(Path(empty) / "empty", patient, args.repeat),
            "big": _measure(folder, patient, args.repeat),
        }
    _report(figures, args.jobs, args.per_job)


# Generating ------------------------------------------------------------------------------


def _build(folder: Path, jobs: int, per_job: int, stamp: str) -> None:
    if not 1 <= per_job <= 89:
        raise SystemExit("--per-job must be 1-89")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.monotonic()
    Database(folder / "cadnode.db").engine.dispose()  # this code's schema and triggers
    connection = sqlite3.connect(folder / "cadnode.db", isolation_level=None)
    for pragma in (
        "journal_mode=OFF",
        "synchronous=OFF",
        "locking_mode=EXCLUSIVE",
        "cache_size=-1000000",
        "temp_store=MEMORY",
        "threads=2",  # CREATE INDEX sorts on both cores
    ):
        connection.execute(f"PRAGMA {pragma}")
    indexes = _without_triggers_and_indexes(connection)
    for table, statement in _generators(jobs, per_job):
        _timed(f"  {table:<12}", lambda s=statement: _run(connection, s))
    for name, sql in indexes:
        _timed(f"  index {name}", lambda s=sql: connection.execute(s))
    connection.execute("PRAGMA journal_mode=WAL")
    connection.close()
    generated = time.monotonic() - started
    # Opening through Database makes the triggers again and recounts every tally from rows.
    recount = _timed(
        "  tallies recounted", lambda: Database(folder / "cadnode.db").engine.dispose()
    )
    (folder / "stamp").write_text(stamp)
    print(
        f"generated {jobs:,} jobs, {jobs * per_job:,} instances in "
        f"{generated + recount:.0f} s ({recount:.0f} s of it recounting the tallies), "
        f"{_size_gb(folder):.1f} GB"
    )


def _run(connection: sqlite3.Connection, statement: str) -> None:
    connection.execute("BEGIN")
    connection.execute(statement)
    connection.execute("COMMIT")


def _without_triggers_and_indexes(connection: sqlite3.Connection) -> list[tuple[str, str]]:
    """Drop the triggers (Database makes them again and recounts) and the big tables'
    secondary indexes (rebuilt once the rows are in: faster than growing them row by row);
    the indexes' CREATE statements."""
    for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        connection.execute(f'DROP TRIGGER "{name}"')
    marks = ",".join("?" * len(BIG_TABLES))
    indexes = connection.execute(
        f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
        f"AND tbl_name IN ({marks})",
        BIG_TABLES,
    ).fetchall()
    for name, _ in indexes:
        connection.execute(f'DROP INDEX "{name}"')
    return [(str(name), str(sql)) for name, sql in indexes]


def _generators(jobs: int, per_job: int) -> list[tuple[str, str]]:
    numbers = f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {jobs}) "
    images = (
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {jobs}), "
        f"k(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM k WHERE j < {per_job - 1}) "
    )
    job_uid = "(1000000 + i)"
    instance_uid = f"'{ROOT}.2.' || {job_uid} || '.' || (10 + j)"
    study_uid = f"'{ROOT}.1.' || {job_uid}"
    series_uid = f"'{ROOT}.4.' || {job_uid}"
    patient = f"'PID' || (100000 + i % {_patients(jobs)})"
    name = f"'PATIENT^' || (100000 + i % {_patients(jobs)})"
    study_date = "strftime('%Y%m%d', 'now', '-' || (i % 3650) || ' days')"

    def moment(seconds: str) -> str:
        return (
            f"strftime('%Y-%m-%d %H:%M:%S', '{T0}', '+' || ({seconds}) || ' seconds') || '.000000'"
        )

    def iso(seconds: str) -> str:
        return (
            f"strftime('%Y-%m-%dT%H:%M:%f', '{T0}', '+' || ({seconds}) || ' seconds') || '+00:00'"
        )

    start = "i * 30"
    steps = {  # seconds after the first instance, varied per job
        "complete": f"{start} + 3 + (i % 7) * 0.5",
        "routed": f"{start} + 3.2 + (i % 7) * 0.5",
        "inferred": f"{start} + 3.6 + (i % 7) * 0.5 + (i % 13) * 0.1",
        "encoded": f"{start} + 4.0 + (i % 7) * 0.5 + (i % 13) * 0.1",
        "delivered": f"{start} + 5.0 + (i % 7) * 0.5 + (i % 13) * 0.1 + (i % 29)",
    }
    state = "CASE i % 1000 WHEN 0 THEN 'failed' WHEN 1 THEN 'encoded' ELSE 'delivered' END"
    reached = "CASE WHEN i % 3 = 0 THEN 'false' ELSE 'true' END"
    entries = [f"'{s}', {iso(at)}" for s, at in steps.items()]
    timeline = (
        f"CASE WHEN {state} = 'delivered' THEN json_object({', '.join(entries)}) "
        f"ELSE json_object({', '.join(entries[:-1])}) END"
    )
    statements = {
        "study": (
            numbers,
            "n",
            {"id": "i", "study_uid": study_uid, "created_at": moment(start)},
        ),
        "job": (
            numbers,
            "n",
            {
                "id": "i",
                "study_id": "i",
                "version": "1",
                "state": state,
                "failure": "CASE i % 1000 WHEN 0 THEN 'dead_letter' END",
                "reason": "CASE i % 1000 WHEN 0 THEN 'a result could not be delivered' END",
                "rule": "'chest-radiograph'",
                "pipeline": '\'[{"engine": "cxr-ruleout"}]\'',
                "inputs": "'[]'",
                "priority": "CASE i % 10 WHEN 0 THEN 'urgent' WHEN 9 THEN 'background' "
                "ELSE 'routine' END",
                "instance_count": str(per_job),
                "first_instance_at": moment(start),
                "last_instance_at": moment(f"{start} + 2"),
                "updated_at": moment(steps["delivered"]),
                "attempts": "1",
                "timeline": timeline,
                "indexed_at": moment(steps["complete"]),
            },
        ),
        "instance": (
            images,
            "n, k",
            {
                "sop_instance_uid": instance_uid,
                "sop_class_uid": "'1.2.840.10008.5.1.4.1.1.2'",
                "series_uid": series_uid,
                "transfer_syntax": "'1.2.840.10008.1.2.1'",
                "path": f"{study_uid} || '/' || {series_uid} || '/' || {instance_uid} || '.dcm'",
                "size": "526000",
                "calling_ae": "'MOD' || (i % 5)",
                "called_ae": "'CADNODE'",
                "peer": "'10.0.0.' || (i % 5) || ':104'",
                "job_id": "i",
                "received_at": f"'{T0}.000000'",
            },
        ),
        "queryrecord": (
            images,
            "n, k",
            {
                "sop_instance_uid": instance_uid,
                "held_as": "'instance'",
                "path": f"{study_uid} || '/' || {series_uid} || '/' || {instance_uid} || '.dcm'",
                "patient_id": patient,
                "study_uid": study_uid,
                "series_uid": series_uid,
                "modality": "'CT'",
                "sop_class_uid": "'1.2.840.10008.5.1.4.1.1.2'",
                "transfer_syntax": "'1.2.840.10008.1.2.1'",
                "attributes": _json_object(
                    {
                        "00080016": ("UI", "'1.2.840.10008.5.1.4.1.1.2'"),
                        "00080018": ("UI", instance_uid),
                        "00080060": ("CS", "'CT'"),
                        "0020000E": ("UI", series_uid),
                        "00200011": ("IS", "1"),
                        "00200013": ("IS", "j + 1"),
                        "00280010": ("US", "512"),
                        "00280011": ("US", "512"),
                    }
                ),
            },
        ),
        "querystudy": (
            numbers,
            "n",
            {
                "study_uid": study_uid,
                "patient_id": patient,
                "patient_name": f"upper({name})",
                "patient_birth_date": "'19' || (40 + i % 50) || '0101'",
                "patient_sex": "CASE i % 2 WHEN 0 THEN 'F' ELSE 'M' END",
                "study_date": study_date,
                "study_time": "'120000'",
                "accession_number": "'ACC' || (1000000 + i)",
                "referring_physician_name": "''",
                "study_description": "'CT CHEST'",
                "attributes": _json_object(
                    {
                        "00080020": ("DA", study_date),
                        "00080030": ("TM", "'120000'"),
                        "00080050": ("SH", "'ACC' || (1000000 + i)"),
                        "00081030": ("LO", "'CT CHEST'"),
                        "00100010": ("PN", name),
                        "00100020": ("LO", patient),
                        "00100030": ("DA", "'19' || (40 + i % 50) || '0101'"),
                        "00100040": ("CS", "CASE i % 2 WHEN 0 THEN 'F' ELSE 'M' END"),
                        "0020000D": ("UI", study_uid),
                        "00200010": ("SH", "'1'"),
                    }
                ),
            },
        ),
        "result": (
            numbers,
            "n",
            {
                "id": "i",
                "job_id": "i",
                "engine": "'cxr-ruleout'",
                "engine_version": "'0.1.0'",
                "model_sha256": "'" + "ab" * 32 + "'",
                "sop_instance_uid": f"'{ROOT}.2.' || {job_uid} || '.10'",
                "answer": "json_object('task', 'classify', 'label', json_object('name', "
                "'abnormal'), 'probability', (i % 100) / 100.0, 'operating_points', "
                f"json_object('rule_out', json_object('threshold', 0.47, 'reached', "
                f"json({reached}))), 'ruled_out', json(CASE WHEN i % 3 = 0 THEN 'true' "
                "ELSE 'false' END))",
                "seconds": "0.05 + (i % 40) * 0.01",
                "created_at": moment(steps["inferred"]),
            },
        ),
        "delivery": (
            numbers,
            "n",
            {
                "id": "i",
                "object_uid": f"'{ROOT}.3.' || {job_uid}",
                "job_id": "i",
                "destination": "'pacs'",
                "state": "CASE i % 1000 WHEN 0 THEN 'failed' WHEN 1 THEN 'pending' ELSE 'sent' END",
                "attempts": "CASE i % 1000 WHEN 0 THEN 10 WHEN 1 THEN 0 ELSE 1 + (i % 50 = 0) END",
                "next_attempt_at": moment(steps["encoded"]),
                "sent_at": moment(steps["delivered"]),
            },
        ),
        "auditevent": (
            numbers,
            "n",
            {
                "id": "i",
                "at": moment(start),
                "kind": "'association'",
                "actor": "'MOD' || (i % 5)",
                "address": "'10.0.0.' || (i % 5) || ':104'",
                "outcome": "CASE WHEN i % 100 = 0 THEN 'rejected' ELSE 'accepted' END",
                "details": "CASE WHEN i % 100 = 0 THEN json_object('reason', "
                "'calling AE title not recognised') ELSE '{}' END",
            },
        ),
    }
    return [
        (table, _insert(table, prefix, source, values))
        for table, (prefix, source, values) in statements.items()
    ]


def _json_object(attributes: dict[str, tuple[str, str]]) -> str:
    """DICOM JSON of single-valued attributes (tag -> (VR, SQL for the value)), by printf:
    twice as fast as json_object, and the values here need no escaping."""
    parts = []
    for tag, (vr, _) in attributes.items():
        shown = {"PN": '{"Alphabetic":"%s"}', "IS": "%s", "US": "%s"}.get(vr, '"%s"')
        parts.append(f'"{tag}":{{"vr":"{vr}","Value":[{shown}]}}')
    values = ", ".join(value for _, value in attributes.values())
    return f"printf('{{{','.join(parts)}}}', {values})"


def _insert(table: str, prefix: str, source: str, values: dict[str, str]) -> str:
    """INSERT ... SELECT for every column of the table: those given, and any other (a column
    added since this was written) NULL, or else 0, "" or its enum's first member."""
    columns = SQLModel.metadata.tables[table].columns
    unknown = set(values) - {column.name for column in columns}
    if unknown:
        raise SystemExit(f"the generator names columns {table} lacks: {sorted(unknown)}")
    chosen = {column.name: values.get(column.name) or _filler(column) for column in columns}
    names = ", ".join(chosen)
    return (
        f"{prefix}INSERT INTO {table} ({names}) SELECT {', '.join(chosen.values())} FROM {source}"
    )


def _filler(column: Any) -> str:
    if column.nullable:
        return "NULL"
    if isinstance(column.type, SqlEnum):
        return f"'{column.type.enums[0]}'"
    if isinstance(column.type, Integer | Float | Numeric | Boolean):
        return "0"
    return "''"


def _stamp(jobs: int, per_job: int) -> str:
    """What the cached database must have been made with: this code's tables and indexes
    (as an empty database gets them) and the generator's version."""
    with tempfile.TemporaryDirectory(prefix="cadnode-schema-") as folder:
        database = Database(Path(folder) / "cadnode.db")
        with database.engine.connect() as connection:
            schema = connection.exec_driver_sql(
                "SELECT type, name, sql FROM sqlite_master WHERE type IN ('table', 'index') "
                "ORDER BY name"
            ).fetchall()
        database.engine.dispose()
    shape = json.dumps([GENERATOR, jobs, per_job, [list(row) for row in schema]])
    return hashlib.sha256(shape.encode()).hexdigest()


def _stamp_of(folder: Path) -> str | None:
    stamp = folder / "stamp"
    return stamp.read_text() if stamp.exists() and (folder / "cadnode.db").exists() else None


def _patient_id(job: int, jobs: int) -> str:
    """The Patient ID `_generators` gives job `job` (of `jobs`)."""
    return f"PID{100000 + job % _patients(jobs)}"


def _patients(jobs: int) -> int:
    return max(1, jobs // PATIENTS_EVERY)


# Measuring -------------------------------------------------------------------------------


def _measure(folder: Path, patient: str, repeat: int) -> dict[str, Any]:
    settings = Settings.model_validate({"storage": {"data_dir": str(folder), "min_free_mb": 0}})
    settings.storage.spool.mkdir(parents=True, exist_ok=True)
    database = Database(settings.database_url)
    context = AdminContext(
        settings=settings,
        database=database,
        configured_engines=[],
        engines=[],
        rules=lambda: None,  # type: ignore[arg-type,return-value]  # /metrics reads no rules
    )
    index = QueryIndex(database, settings.storage.spool, settings.storage.results)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = patient
    for keyword in (
        "PatientName",
        "StudyInstanceUID",
        "StudyDate",
        "StudyDescription",
        "AccessionNumber",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
    ):
        setattr(identifier, keyword, "")
    request = checked(identifier, STUDY_ROOT)
    answers: list[int] = []

    def query() -> None:
        answers.append(sum(1 for _ in find(request, index, "CADNODE")))

    def scrape() -> None:
        metrics.render(context)

    figures = {"scrape": _times(scrape, repeat), "find": _times(query, repeat)}
    figures["matches"] = answers[-1]
    figures["scrape_bytes"] = len(metrics.render(context))
    database.engine.dispose()
    return figures


def _times(action: Callable[[], None], repeat: int) -> dict[str, float]:
    cold = _seconds(action)
    warm = statistics.median(_seconds(action) for _ in range(repeat))
    return {"cold": cold, "warm": warm}


def _seconds(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _report(figures: dict[str, dict[str, Any]], jobs: int, per_job: int) -> None:
    empty, big = figures["empty"], figures["big"]
    print(f"database: {jobs:,} jobs, {jobs * per_job:,} instances; against an empty one")
    for what, title in (("scrape", "/metrics scrape"), ("find", "C-FIND STUDY on a Patient ID")):
        for when in ("cold", "warm"):
            ratio = big[what][when] / empty[what][when]
            print(
                f"  {title:<30} {when}: {big[what][when] * 1000:8.1f} ms  "
                f"(empty: {empty[what][when] * 1000:6.1f} ms)  ratio {ratio:5.1f}x"
            )
    print(f"  C-FIND matches: {big['matches']} (empty: {empty['matches']})")
    print(f"  /metrics body: {big['scrape_bytes']:,} bytes (empty: {empty['scrape_bytes']:,})")


def _timed(label: str, action: Callable[[], object]) -> float:
    seconds = _seconds(lambda: action())
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds


def _size_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("cadnode.db*")) / 1e9


if __name__ == "__main__":
    main()
