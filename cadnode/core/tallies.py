"""Tallies: the figures /metrics reports, kept by SQLite triggers in the commit of each change.

A scrape reads one row per metric series (`MetricTally`, `MetricBucket` in
cadnode/core/db.py) instead of counting and reading every job, instance, answer and audit
event. Triggers rather than code in each stage, because then every writer keeps them without
knowing of metrics (receive's own compiled inserts, each stage's transitions, the outboxes,
an admin's retry, housekeeping's deletes), and a kill at any moment leaves them agreeing with
the rows they count: they commit, or roll back, with the change itself.

- Counters only grow: deleting a row uncounts nothing (so housekeeping does not make
  Prometheus see a reset), and an admin's retry, which sets a delivery's attempts back to
  0, takes nothing back from the retries counted.
- Gauges (jobs per state and priority, deliveries and publications per destination and
  state) follow every insert, change of state and delete.
- Histograms are cumulative buckets (LATENCY_BUCKETS_S, then +Inf) and a sum; each
  observation is made once, when the second of its two moments becomes known.

`install` runs each time a Database opens the file: when the triggers are missing or not
this code's (a new database, an upgrade, a revision that copied a table, which drops its
triggers), it replaces them and recounts every tally from the rows, in one transaction.

The same triggers keep the query index whole (cadnode/dicom/indexing.py): an instance's or
result object's row deleted takes its QueryRecord with it, and a study's last QueryRecord
its QueryStudy.

Stored enum values are written here as SQLite holds them (the member's name; a test holds
them to cadnode/core/db.py's enums): this module cannot import db.py, which imports it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import structlog
from sqlalchemy import Engine

log = structlog.get_logger("cadnode.db")

PREFIX = "cadnode_"  # every trigger this module owns, and no other, is named so
# (stage, from state, to state): how long each step of the flow took. "received" is the job's
# first instance; "published" the worklist priority reaching its first recipient.
STAGES = (
    ("complete", "received", "complete"),
    ("routed", "complete", "routed"),
    ("inferred", "routed", "inferred"),
    ("encoded", "inferred", "encoded"),
    ("delivered", "encoded", "delivered"),
    ("published", "inferred", "published"),
    ("total", "received", "delivered"),
)
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
INF = float("inf")
_BOUNDS = "(VALUES " + ", ".join(f"({float(b)!r})" for b in LATENCY_BUCKETS_S) + ", (9e999))"

# Stored values (enum member names) the triggers test.
_SENT = "'sent'"  # PublicationState.sent
_ASSOCIATION = "'association'"  # AuditKind.association
_REJECTED = "'rejected'"  # AuditOutcome.rejected
_INSTANCE, _RESULT = "'instance'", "'result'"  # HeldAs


# The statements -------------------------------------------------------------------------


def _add(
    metric: str,
    amount: str,
    where: str = "true",
    *,
    label: str = "''",
    second: str = "''",
    source: str = "",
) -> str:
    """Add `amount` (summed over `source`'s rows where `where` holds) to a tally series."""
    origin = f"FROM {source} " if source else ""
    return (
        "INSERT INTO metrictally (metric, label, second_label, value) "
        f"SELECT '{metric}', {label}, {second}, total({amount}) {origin}"
        f"WHERE {where} GROUP BY 2, 3 "
        "ON CONFLICT (metric, label, second_label) DO UPDATE SET value = value + excluded.value"
    )


def _observe(metric: str, label: str, seconds: str, where: str, source: str = "") -> list[str]:
    """Observe `seconds` (of `source`'s rows where `where` holds) into a histogram: its
    buckets, its sum. Each row's seconds are worked out once (LIMIT -1 keeps SQLite from
    folding the subquery into the query around it) and counted in its own bucket; those
    counts are then added up into the cumulative ones."""
    origin = f"FROM {source} " if source else ""
    observed = (
        f"(SELECT {label} AS label, {seconds} AS seconds {origin}WHERE {where} LIMIT -1) "
        "AS observed"
    )
    own_bucket = (
        f"(SELECT min(own.column1) FROM {_BOUNDS} AS own WHERE own.column1 >= observed.seconds)"
    )
    per_bucket = (
        f"(SELECT observed.label AS label, {own_bucket} AS le, count(*) AS count "
        f"FROM {observed} WHERE observed.seconds IS NOT NULL GROUP BY 1, 2) AS per_bucket"
    )
    buckets = (
        "INSERT INTO metricbucket (metric, label, le, count) "
        f"SELECT '{metric}', per_bucket.label, bound.column1, sum(per_bucket.count) "
        f"FROM {per_bucket}, {_BOUNDS} AS bound WHERE per_bucket.le <= bound.column1 "
        "GROUP BY 2, 3 "
        "ON CONFLICT (metric, label, le) DO UPDATE SET count = count + excluded.count"
    )
    total = _add(
        f"{metric}_sum",
        "observed.seconds",
        "observed.seconds IS NOT NULL",
        label="observed.label",
        source=observed,
    )
    return [buckets, total]


def _gauge(metric: str, row: str, label: str, second: str, step: int) -> str:
    return _add(
        metric, str(step), label=f"{row}.{label}", second=f"{row}.{second}" if second else "''"
    )


def _moment(row: str, state: str) -> str:
    """When a job (`row`) first entered `state`: its timeline's entry, or its first instance."""
    if state == "received":
        return f"{row}.first_instance_at"
    if state == "published":
        return _first_sent(row)
    return f"json_extract({row}.timeline, '$.{state}')"


def _first_sent(row: str) -> str:
    """When the job's priority first reached a recipient (NULL: not yet)."""
    return (
        "(SELECT min(sent.sent_at) FROM studypriority AS decision "
        "JOIN publication AS sent ON sent.decision_id = decision.id "
        f"WHERE decision.job_id = {row}.id AND sent.state = {_SENT})"
    )


def _known(row: str, start: str, end: str) -> str:
    return f"({_moment(row, start)} IS NOT NULL AND {_moment(row, end)} IS NOT NULL)"


def _seconds(start: str, end: str) -> str:
    return f"max(0.0, (julianday({end}) - julianday({start})) * 86400.0)"


def _stage(row: str, start: str, end: str) -> str:
    return _seconds(_moment(row, start), _moment(row, end))


def answer_positive(row: str) -> str:
    """Whether an answer reached an operating point, its own or a finding's: the SQL of
    cadnode.infer.answers' `positive` (a test holds the two to the same answers)."""
    reached = "json_extract(point.value, '$.reached') = 1"
    return (
        f"(EXISTS (SELECT 1 FROM json_each({row}.answer, '$.operating_points') AS point "
        f"WHERE {reached}) OR EXISTS (SELECT 1 FROM json_each({row}.answer, '$.findings') "
        f"AS finding, json_each(finding.value, '$.operating_points') AS point WHERE {reached}))"
    )


def _first_call(row: str) -> str:
    """The first answer of an engine call: a batched call answers several images, one time."""
    return (
        f"{row}.seconds IS NOT NULL AND NOT EXISTS (SELECT 1 FROM result AS other "
        f"WHERE other.job_id = {row}.job_id AND other.engine = {row}.engine "
        f"AND other.seconds = {row}.seconds AND other.id != {row}.id)"
    )


# The triggers ---------------------------------------------------------------------------


def _instance_inserted() -> list[str]:
    another_from_same = (
        "NOT EXISTS (SELECT 1 FROM job AS version JOIN instance AS other "
        "ON other.job_id = version.id WHERE version.study_id = "
        "(SELECT study_id FROM job WHERE id = NEW.job_id) "
        "AND other.calling_ae = NEW.calling_ae "
        "AND other.sop_instance_uid != NEW.sop_instance_uid)"
    )
    return [
        _add("instances_received", "1", label="NEW.calling_ae"),
        _add("studies_received", "1", another_from_same, label="NEW.calling_ae"),
    ]


def _job_stages(new: str, old: str | None) -> list[str]:
    """Observe each stage whose two moments are both known now and were not before."""
    statements = []
    for stage, start, end in STAGES:
        if end == "published":
            continue  # observed when the publication is sent, or below
        where = _known(new, start, end)
        if old is not None:
            where += f" AND NOT {_known(old, start, end)}"
        statements += _observe("stage_seconds", f"'{stage}'", _stage(new, start, end), where)
    if old is not None:  # the engines answered after the priority was published
        inferred_now = (
            f"{_moment(new, 'inferred')} IS NOT NULL AND {_moment(old, 'inferred')} IS NULL"
        )
        statements += _observe(
            "stage_seconds", "'published'", _stage(new, "inferred", "published"), inferred_now
        )
    return statements


def _publication_sent(*, update: bool) -> list[str]:
    """The job's first publication sent: its "published" stage, if the engines answered."""
    became = f"OLD.state IS NOT {_SENT} AND " if update else ""
    first = (
        f"{became}NEW.state = {_SENT} AND owner.id = "
        "(SELECT job_id FROM studypriority WHERE id = NEW.decision_id) "
        f"AND {_moment('owner', 'inferred')} IS NOT NULL AND NOT EXISTS (SELECT 1 "
        "FROM studypriority AS decision JOIN publication AS sent "
        "ON sent.decision_id = decision.id WHERE decision.job_id = owner.id "
        f"AND sent.state = {_SENT} AND sent.id != NEW.id)"
    )
    seconds = _seconds(_moment("owner", "inferred"), "NEW.sent_at")
    return _observe("stage_seconds", "'published'", seconds, first, source="job AS owner")


def _result_inserted() -> list[str]:
    return [
        _add("engine_answers", "1", label="NEW.engine"),
        _add("engine_positive_answers", answer_positive("NEW"), label="NEW.engine"),
        *_observe("engine_inference_seconds", "NEW.engine", "NEW.seconds", _first_call("NEW")),
    ]


def _retries(row: str) -> str:
    return f"max({row}.attempts - 1, 0)"


def _audited(kind: str = "true", source: str = "") -> list[str]:
    """Association requests, by outcome, and the rejected ones by reason."""
    return [
        _add("associations", "1", kind, label="NEW.outcome", source=source),
        _add(
            "association_rejections",
            "1",
            f"{kind} AND NEW.outcome = {_REJECTED}",
            label="coalesce(json_extract(NEW.details, '$.reason'), 'unknown')",
            source=source,
        ),
    ]


def _index_cleanup() -> dict[str, tuple[str, list[str]]]:
    """Query index rows go with the rows of what they index."""
    return {
        "index_instance_deleted": (
            "AFTER DELETE ON instance",
            [
                "DELETE FROM queryrecord WHERE sop_instance_uid = OLD.sop_instance_uid "
                f"AND held_as = {_INSTANCE}"
            ],
        ),
        "index_result_deleted": (
            "AFTER DELETE ON resultobject",
            [
                "DELETE FROM queryrecord WHERE sop_instance_uid = OLD.sop_instance_uid "
                f"AND held_as = {_RESULT}"
            ],
        ),
        "index_record_deleted": (
            "AFTER DELETE ON queryrecord",
            [
                "DELETE FROM querystudy WHERE study_uid = OLD.study_uid AND NOT EXISTS "
                "(SELECT 1 FROM queryrecord WHERE study_uid = OLD.study_uid)"
            ],
        ),
    }


def _definitions() -> dict[str, tuple[str, list[str]]]:
    """Each trigger: its name (without the prefix), when it fires, its statements."""
    state_or_priority = "OLD.state IS NOT NEW.state OR OLD.priority IS NOT NEW.priority"
    delivery_moved = "OLD.state IS NOT NEW.state OR OLD.destination IS NOT NEW.destination"
    publication_moved = "OLD.state IS NOT NEW.state OR OLD.destination IS NOT NEW.destination"
    return {
        "instance_inserted": ("AFTER INSERT ON instance", _instance_inserted()),
        "job_inserted": (
            "AFTER INSERT ON job",
            [_gauge("jobs", "NEW", "state", "priority", 1), *_job_stages("NEW", None)],
        ),
        "job_moved": (
            f"AFTER UPDATE OF state, priority ON job WHEN {state_or_priority}",
            [
                _gauge("jobs", "OLD", "state", "priority", -1),
                _gauge("jobs", "NEW", "state", "priority", 1),
            ],
        ),
        "job_timed": (
            "AFTER UPDATE OF timeline, first_instance_at ON job",
            _job_stages("NEW", "OLD"),
        ),
        "job_deleted": ("AFTER DELETE ON job", [_gauge("jobs", "OLD", "state", "priority", -1)]),
        "result_inserted": ("AFTER INSERT ON result", _result_inserted()),
        "delivery_inserted": (
            "AFTER INSERT ON delivery",
            [
                _gauge("deliveries", "NEW", "destination", "state", 1),
                _add("delivery_retries", _retries("NEW"), label="NEW.destination"),
            ],
        ),
        "delivery_moved": (
            f"AFTER UPDATE OF state, destination ON delivery WHEN {delivery_moved}",
            [
                _gauge("deliveries", "OLD", "destination", "state", -1),
                _gauge("deliveries", "NEW", "destination", "state", 1),
            ],
        ),
        "delivery_attempted": (
            f"AFTER UPDATE OF attempts ON delivery WHEN {_retries('NEW')} > {_retries('OLD')}",
            [
                _add(
                    "delivery_retries",
                    f"{_retries('NEW')} - {_retries('OLD')}",
                    label="NEW.destination",
                )
            ],
        ),
        "delivery_deleted": (
            "AFTER DELETE ON delivery",
            [_gauge("deliveries", "OLD", "destination", "state", -1)],
        ),
        "publication_inserted": (
            "AFTER INSERT ON publication",
            [
                _gauge("publications", "NEW", "destination", "state", 1),
                *_publication_sent(update=False),
            ],
        ),
        "publication_moved": (
            f"AFTER UPDATE OF state, destination ON publication WHEN {publication_moved}",
            [
                _gauge("publications", "OLD", "destination", "state", -1),
                _gauge("publications", "NEW", "destination", "state", 1),
                *_publication_sent(update=True),
            ],
        ),
        "publication_deleted": (
            "AFTER DELETE ON publication",
            [_gauge("publications", "OLD", "destination", "state", -1)],
        ),
        "association_audited": (
            f"AFTER INSERT ON auditevent WHEN NEW.kind = {_ASSOCIATION}",
            _audited(),
        ),
        **_index_cleanup(),
    }


def triggers() -> dict[str, str]:
    """Every trigger this module keeps, by name: its CREATE statement."""
    return {
        PREFIX + name: f"CREATE TRIGGER {PREFIX}{name} {when} BEGIN "
        + "".join(f"{statement}; " for statement in statements)
        + "END"
        for name, (when, statements) in _definitions().items()
    }


# Recounting from the rows ---------------------------------------------------------------


def _recount() -> Iterator[str]:
    """Every tally computed afresh from the rows (the triggers' statements over whole tables)."""
    yield "DELETE FROM metrictally"
    yield "DELETE FROM metricbucket"
    yield _add("instances_received", "1", label="NEW.calling_ae", source="instance AS NEW")
    yield _add(
        "studies_received",
        "1",
        label="NEW.calling_ae",
        source="(SELECT DISTINCT other.calling_ae, version.study_id FROM instance AS other "
        "JOIN job AS version ON version.id = other.job_id) AS NEW",
    )
    yield _add("jobs", "1", label="NEW.state", second="NEW.priority", source="job AS NEW")
    # Each job's moments read once (its timeline parsed once), then every stage from them.
    states = sorted({state for _, start, end in STAGES for state in (start, end)})
    read = ", ".join(f"julianday({_moment('NEW', state)}) AS {state}" for state in states)
    yield f"CREATE TEMP TABLE moments AS SELECT {read} FROM job AS NEW"
    for stage, start, end in STAGES:
        yield from _observe(
            "stage_seconds",
            f"'{stage}'",
            f"max(0.0, (moments.{end} - moments.{start}) * 86400.0)",
            f"moments.{start} IS NOT NULL AND moments.{end} IS NOT NULL",
            source="temp.moments AS moments",
        )
    yield "DROP TABLE temp.moments"
    yield _add("engine_answers", "1", label="NEW.engine", source="result AS NEW")
    yield _add(
        "engine_positive_answers",
        answer_positive("NEW"),
        label="NEW.engine",
        source="result AS NEW",
    )
    yield from _observe(
        "engine_inference_seconds",
        "NEW.engine",
        "NEW.seconds",
        "NEW.seconds IS NOT NULL",
        source="(SELECT DISTINCT engine, job_id, seconds FROM result) AS NEW",
    )
    for table, metric in (("delivery", "deliveries"), ("publication", "publications")):
        yield _add(
            metric, "1", label="NEW.destination", second="NEW.state", source=f"{table} AS NEW"
        )
    yield _add(
        "delivery_retries", _retries("NEW"), label="NEW.destination", source="delivery AS NEW"
    )
    yield from _audited(f"NEW.kind = {_ASSOCIATION}", source="auditevent AS NEW")


# Installing -----------------------------------------------------------------------------


def install(engine: Engine) -> bool:
    """Make the database's triggers this code's; True when they were (re)made and every tally
    recounted. Cheap when they are already: one read of the schema."""
    wanted = triggers()
    raw = engine.raw_connection()
    try:
        driver: Any = raw.driver_connection
        if _installed(driver) == wanted:
            return False
        isolation = driver.isolation_level
        driver.isolation_level = None  # our BEGIN IMMEDIATE, not the driver's own
        try:
            return _replace(driver, wanted)
        finally:
            driver.isolation_level = isolation
    finally:
        raw.close()


def _installed(driver: Any) -> dict[str, str]:
    rows = driver.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND substr(name, 1, ?) = ?",
        (len(PREFIX), PREFIX),
    ).fetchall()
    return {str(name): str(sql) for name, sql in rows}


def _replace(driver: Any, wanted: dict[str, str]) -> bool:
    started = time.monotonic()
    driver.execute("BEGIN IMMEDIATE")
    try:
        found = _installed(driver)  # again, now alone: another process may have done it
        if found == wanted:
            driver.execute("ROLLBACK")
            return False
        for name in found:
            driver.execute(f'DROP TRIGGER "{name}"')
        for statement in wanted.values():
            driver.execute(statement)
        for statement in _recount():
            driver.execute(statement)
        driver.execute("COMMIT")
    except BaseException:
        driver.execute("ROLLBACK")
        raise
    log.info(
        "metrics.recounted",
        triggers=len(wanted),
        replaced=len(found),
        seconds=round(time.monotonic() - started, 3),
    )
    return True
