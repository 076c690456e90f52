"""Tallies: the figures /metrics reports, kept by triggers in the commit of each change.

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

Stored enum values are written here as the database holds them (the member's name; a test
holds them to cadnode/core/db.py's enums): this module cannot import db.py, which imports it.

One source for both databases: each trigger's statements are written once, over `Spelling`,
which says the few things SQLite and PostgreSQL spell differently (JSON, times, NULL-safe
comparison, where a change goes). On SQLite each is a trigger with its statements; on
PostgreSQL a PL/pgSQL function running the same statements, and a row trigger calling it.

Where a change goes: SQLite has one writer at a time, so its triggers add to the series' row
itself. PostgreSQL has many (receivers, workers, nodes), and every job's transition would
update the same few rows (the jobs gauge of each state, a histogram's buckets): each writer
would wait for the last to commit, and two transactions taking two such rows in opposite
orders (a replay moving a job back while the stage moves another on; one histogram's buckets
in the order a hash aggregate happens to produce) deadlock, and PostgreSQL aborts one. So
there the triggers only append the change (`MetricTallyDelta`, `MetricBucketDelta`), which
locks nothing another writer needs; a scrape adds the changes to the rows (`SERIES`,
`BUCKETS`), and `compact` folds them into the rows now and then, one process at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, text

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
# PostgreSQL: one transaction at a time replaces the triggers or folds the changes into the
# rows ("tlly" in ASCII): the only writers of metrictally and metricbucket there.
INSTALL_LOCK_KEY = 0x746C6C79
COMPACT_EVERY_S = 10.0

# Stored values (enum member names) the triggers test.
_SENT = "'sent'"  # PublicationState.sent
_ASSOCIATION = "'association'"  # AuditKind.association
_REJECTED = "'rejected'"  # AuditOutcome.rejected
_INSTANCE, _RESULT = "'instance'", "'result'"  # HeldAs


class Spelling:
    """SQL as SQLite spells it; `PostgresSpelling` where PostgreSQL differs."""

    name = "sqlite"
    bounds = "(VALUES " + ", ".join(f"({float(b)!r})" for b in LATENCY_BUCKETS_S) + ", (9e999))"
    unfolded = "LIMIT -1"  # keeps SQLite from folding a subquery into the query around it
    temporary = "temp"  # the schema of temporary tables
    # Where the triggers write a series' change, and a histogram bucket's: the rows
    # themselves, added to (see the module's doc).
    series = "metrictally"
    buckets = "metricbucket"

    def accumulated(self, key: str, amount: str) -> str:
        """What ends an INSERT of changes into `series` or `buckets`: add to the row there."""
        return f" ON CONFLICT ({key}) DO UPDATE SET {amount} = {amount} + excluded.{amount}"

    def total(self, amount: str) -> str:
        return f"total({amount})"

    def number(self, condition: str) -> str:
        """A condition as 1 or 0 (SQLite's conditions are already)."""
        return condition

    def greatest(self, first: str, second: str) -> str:
        """The larger of two values that are not NULL (on a NULL the two databases differ:
        SQLite's max() gives NULL, PostgreSQL's greatest() the other value)."""
        return f"max({first}, {second})"

    def differs(self, first: str, second: str) -> str:
        """NULL-safe inequality."""
        return f"{first} IS NOT {second}"

    def json_text(self, document: str, key: str) -> str:
        return f"json_extract({document}, '$.{key}')"

    def json_time(self, document: str, key: str) -> str:
        """An ISO time under `key`, as something `days` reads."""
        return self.json_text(document, key)

    def json_true(self, document: str, key: str) -> str:
        return f"json_extract({document}, '$.{key}') = 1"

    def items(self, document: str, key: str, alias: str) -> str:
        """The items of the array under `key`, as rows of `alias` with a `value` column."""
        return f"json_each({document}, '$.{key}') AS {alias}"

    def members(self, document: str, key: str, alias: str) -> str:
        """The values of the object under `key`, as rows of `alias` with a `value` column."""
        return self.items(document, key, alias)

    def days(self, moment: str) -> str:
        """A time as a number of days (only differences of two are used)."""
        return f"julianday({moment})"

    def before(self, other: str, row: str) -> str:
        """`other` is another row written before `row`. SQLite runs a row's trigger as the row
        is written, so the rows there are the earlier ones; PostgreSQL runs AFTER triggers at
        the end of the statement, when a multi-row statement's later rows are there too."""
        return f"{other}.id != {row}.id"


class PostgresSpelling(Spelling):
    name = "postgresql"
    bounds = (
        "(VALUES "
        + ", ".join(f"(CAST({float(b)!r} AS double precision))" for b in LATENCY_BUCKETS_S)
        + ", (CAST('Infinity' AS double precision)))"
    )
    unfolded = "OFFSET 0"
    temporary = "pg_temp"
    series = "metrictallydelta"
    buckets = "metricbucketdelta"

    def accumulated(self, key: str, amount: str) -> str:
        return ""  # appended: `compact` adds them up later

    def total(self, amount: str) -> str:
        return f"coalesce(sum({amount}), 0)"

    def number(self, condition: str) -> str:
        return f"CAST(({condition}) AS integer)"

    def greatest(self, first: str, second: str) -> str:
        return f"greatest({first}, {second})"

    def differs(self, first: str, second: str) -> str:
        return f"{first} IS DISTINCT FROM {second}"

    def json_text(self, document: str, key: str) -> str:
        return f"({document} ->> '{key}')"

    def json_time(self, document: str, key: str) -> str:
        return f"CAST({self.json_text(document, key)} AS timestamptz)"

    def json_true(self, document: str, key: str) -> str:
        return f"{self.json_text(document, key)} = 'true'"

    def items(self, document: str, key: str, alias: str) -> str:
        return f"json_array_elements({document} -> '{key}') AS {alias}(value)"

    def members(self, document: str, key: str, alias: str) -> str:
        return f"json_each({document} -> '{key}') AS {alias}(key, value)"

    def days(self, moment: str) -> str:
        return f"(CAST(extract(epoch FROM {moment}) AS double precision) / 86400.0)"

    def before(self, other: str, row: str) -> str:
        return f"{other}.id < {row}.id"


SQLITE, POSTGRESQL = Spelling(), PostgresSpelling()


def spelling(dialect_name: str) -> Spelling:
    """The spelling for a SQLAlchemy dialect's name ("sqlite", "postgresql")."""
    return POSTGRESQL if dialect_name == POSTGRESQL.name else SQLITE


# The statements -------------------------------------------------------------------------


def _add(
    sql: Spelling,
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
        f"INSERT INTO {sql.series} (metric, label, second_label, value) "
        f"SELECT '{metric}', {label}, {second}, {sql.total(amount)} {origin}"
        f"WHERE {where} GROUP BY 2, 3" + sql.accumulated("metric, label, second_label", "value")
    )


def _observe(
    sql: Spelling, metric: str, label: str, seconds: str, where: str, source: str = ""
) -> list[str]:
    """Observe `seconds` (of `source`'s rows where `where` holds) into a histogram: its
    buckets, its sum. Each row's seconds are worked out once (`unfolded` keeps the database
    from folding the subquery into the query around it) and counted in its own bucket; those
    counts are then added up into the cumulative ones."""
    origin = f"FROM {source} " if source else ""
    observed = (
        f"(SELECT {label} AS label, {seconds} AS seconds {origin}WHERE {where} {sql.unfolded}) "
        "AS observed"
    )
    own_bucket = (
        f"(SELECT min(own.column1) FROM {sql.bounds} AS own WHERE own.column1 >= observed.seconds)"
    )
    per_bucket = (
        f"(SELECT observed.label AS label, {own_bucket} AS le, count(*) AS count "
        f"FROM {observed} WHERE observed.seconds IS NOT NULL GROUP BY 1, 2) AS per_bucket"
    )
    buckets = (
        f"INSERT INTO {sql.buckets} (metric, label, le, count) "
        f"SELECT '{metric}', per_bucket.label, bound.column1, sum(per_bucket.count) "
        f"FROM {per_bucket}, {sql.bounds} AS bound WHERE per_bucket.le <= bound.column1 "
        "GROUP BY 2, 3" + sql.accumulated("metric, label, le", "count")
    )
    total = _add(
        sql,
        f"{metric}_sum",
        "observed.seconds",
        "observed.seconds IS NOT NULL",
        label="observed.label",
        source=observed,
    )
    return [buckets, total]


def _gauge(sql: Spelling, metric: str, row: str, label: str, second: str, step: int) -> str:
    return _add(
        sql,
        metric,
        str(step),
        label=f"{row}.{label}",
        second=f"{row}.{second}" if second else "''",
    )


def _moment(sql: Spelling, row: str, state: str) -> str:
    """When a job (`row`) first entered `state`: its timeline's entry, or its first instance."""
    if state == "received":
        return f"{row}.first_instance_at"
    if state == "published":
        return _first_sent(row)
    return sql.json_time(f"{row}.timeline", state)


def _first_sent(row: str) -> str:
    """When the job's priority first reached a recipient (NULL: not yet)."""
    return (
        "(SELECT min(sent.sent_at) FROM studypriority AS decision "
        "JOIN publication AS sent ON sent.decision_id = decision.id "
        f"WHERE decision.job_id = {row}.id AND sent.state = {_SENT})"
    )


def _known(sql: Spelling, row: str, start: str, end: str) -> str:
    return f"({_moment(sql, row, start)} IS NOT NULL AND {_moment(sql, row, end)} IS NOT NULL)"


def _seconds(sql: Spelling, start: str, end: str) -> str:
    return sql.greatest("0.0", f"({sql.days(end)} - {sql.days(start)}) * 86400.0")


def _stage(sql: Spelling, row: str, start: str, end: str) -> str:
    return _seconds(sql, _moment(sql, row, start), _moment(sql, row, end))


def answer_positive(row: str, sql: Spelling = SQLITE) -> str:
    """Whether an answer reached an operating point, its own or a finding's: the SQL of
    cadnode.infer.answers' `positive` (a test holds the two to the same answers), as 1 or 0."""
    reached = sql.json_true("point.value", "reached")
    own = sql.members(f"{row}.answer", "operating_points", "point")
    findings = sql.items(f"{row}.answer", "findings", "finding")
    of_finding = sql.members("finding.value", "operating_points", "point")
    return sql.number(
        f"(EXISTS (SELECT 1 FROM {own} WHERE {reached}) OR EXISTS (SELECT 1 FROM {findings}, "
        f"{of_finding} WHERE {reached}))"
    )


def _first_call(sql: Spelling, row: str) -> str:
    """The first answer of an engine call: a batched call answers several images, one time."""
    return (
        f"{row}.seconds IS NOT NULL AND NOT EXISTS (SELECT 1 FROM result AS other "
        f"WHERE other.job_id = {row}.job_id AND other.engine = {row}.engine "
        f"AND other.seconds = {row}.seconds AND {sql.before('other', row)})"
    )


# The triggers ---------------------------------------------------------------------------


def _instance_inserted(sql: Spelling) -> list[str]:
    another_from_same = (
        "NOT EXISTS (SELECT 1 FROM job AS version JOIN instance AS other "
        "ON other.job_id = version.id WHERE version.study_id = "
        "(SELECT study_id FROM job WHERE id = NEW.job_id) "
        "AND other.calling_ae = NEW.calling_ae "
        "AND other.sop_instance_uid != NEW.sop_instance_uid)"
    )
    return [
        _add(sql, "instances_received", "1", label="NEW.calling_ae"),
        _add(sql, "studies_received", "1", another_from_same, label="NEW.calling_ae"),
    ]


def _job_stages(sql: Spelling, new: str, old: str | None) -> list[str]:
    """Observe each stage whose two moments are both known now and were not before."""
    statements = []
    for stage, start, end in STAGES:
        if end == "published":
            continue  # observed when the publication is sent, or below
        where = _known(sql, new, start, end)
        if old is not None:
            where += f" AND NOT {_known(sql, old, start, end)}"
        seconds = _stage(sql, new, start, end)
        statements += _observe(sql, "stage_seconds", f"'{stage}'", seconds, where)
    if old is not None:  # the engines answered after the priority was published
        # Both moments tested, not left to the NULL seconds of a priority not yet published:
        # PostgreSQL's greatest() skips a NULL where SQLite's max() returns it.
        inferred_now = (
            f"{_known(sql, new, 'inferred', 'published')} "
            f"AND {_moment(sql, old, 'inferred')} IS NULL"
        )
        seconds = _stage(sql, new, "inferred", "published")
        statements += _observe(sql, "stage_seconds", "'published'", seconds, inferred_now)
    return statements


def _publication_sent(sql: Spelling, *, update: bool) -> list[str]:
    """The job's first publication sent: its "published" stage, if the engines answered."""
    became = f"{sql.differs('OLD.state', _SENT)} AND " if update else ""
    first = (
        f"{became}NEW.state = {_SENT} AND owner.id = "
        "(SELECT job_id FROM studypriority WHERE id = NEW.decision_id) "
        f"AND {_moment(sql, 'owner', 'inferred')} IS NOT NULL AND NOT EXISTS (SELECT 1 "
        "FROM studypriority AS decision JOIN publication AS sent "
        "ON sent.decision_id = decision.id WHERE decision.job_id = owner.id "
        f"AND sent.state = {_SENT} AND sent.id != NEW.id)"
    )
    seconds = _seconds(sql, _moment(sql, "owner", "inferred"), "NEW.sent_at")
    return _observe(sql, "stage_seconds", "'published'", seconds, first, source="job AS owner")


def _result_inserted(sql: Spelling) -> list[str]:
    return [
        _add(sql, "engine_answers", "1", label="NEW.engine"),
        _add(sql, "engine_positive_answers", answer_positive("NEW", sql), label="NEW.engine"),
        *_observe(
            sql, "engine_inference_seconds", "NEW.engine", "NEW.seconds", _first_call(sql, "NEW")
        ),
    ]


def _retries(sql: Spelling, row: str) -> str:
    return sql.greatest(f"{row}.attempts - 1", "0")


def _audited(sql: Spelling, kind: str = "true", source: str = "") -> list[str]:
    """Association requests, by outcome, and the rejected ones by reason."""
    return [
        _add(sql, "associations", "1", kind, label="NEW.outcome", source=source),
        _add(
            sql,
            "association_rejections",
            "1",
            f"{kind} AND NEW.outcome = {_REJECTED}",
            label=f"coalesce({sql.json_text('NEW.details', 'reason')}, 'unknown')",
            source=source,
        ),
    ]


@dataclass(frozen=True)
class Trigger:
    """When a trigger fires ("AFTER UPDATE OF state ON job"), on which rows (a condition on
    NEW and OLD, or None: every row), and what it runs."""

    event: str
    statements: list[str]
    condition: str | None = None

    @property
    def table(self) -> str:
        return self.event.rsplit(" ", 1)[1]


def _index_cleanup() -> dict[str, Trigger]:
    """Query index rows go with the rows of what they index."""
    return {
        "index_instance_deleted": Trigger(
            "AFTER DELETE ON instance",
            [
                "DELETE FROM queryrecord WHERE sop_instance_uid = OLD.sop_instance_uid "
                f"AND held_as = {_INSTANCE}"
            ],
        ),
        "index_result_deleted": Trigger(
            "AFTER DELETE ON resultobject",
            [
                "DELETE FROM queryrecord WHERE sop_instance_uid = OLD.sop_instance_uid "
                f"AND held_as = {_RESULT}"
            ],
        ),
        "index_record_deleted": Trigger(
            "AFTER DELETE ON queryrecord",
            [
                "DELETE FROM querystudy WHERE study_uid = OLD.study_uid AND NOT EXISTS "
                "(SELECT 1 FROM queryrecord WHERE study_uid = OLD.study_uid)"
            ],
        ),
    }


def _moved(sql: Spelling, *columns: str) -> str:
    return " OR ".join(sql.differs(f"OLD.{c}", f"NEW.{c}") for c in columns)


def _definitions(sql: Spelling) -> dict[str, Trigger]:
    """Each trigger by its name (without the prefix)."""
    return {
        "instance_inserted": Trigger("AFTER INSERT ON instance", _instance_inserted(sql)),
        "job_inserted": Trigger(
            "AFTER INSERT ON job",
            [_gauge(sql, "jobs", "NEW", "state", "priority", 1), *_job_stages(sql, "NEW", None)],
        ),
        "job_moved": Trigger(
            "AFTER UPDATE OF state, priority ON job",
            [
                _gauge(sql, "jobs", "OLD", "state", "priority", -1),
                _gauge(sql, "jobs", "NEW", "state", "priority", 1),
            ],
            _moved(sql, "state", "priority"),
        ),
        "job_timed": Trigger(
            "AFTER UPDATE OF timeline, first_instance_at ON job", _job_stages(sql, "NEW", "OLD")
        ),
        "job_deleted": Trigger(
            "AFTER DELETE ON job", [_gauge(sql, "jobs", "OLD", "state", "priority", -1)]
        ),
        # A shadow version's answers are compared, not counted as the engine's (issue 21).
        "result_inserted": Trigger(
            "AFTER INSERT ON result", _result_inserted(sql), condition="NOT NEW.shadow"
        ),
        "delivery_inserted": Trigger(
            "AFTER INSERT ON delivery",
            [
                _gauge(sql, "deliveries", "NEW", "destination", "state", 1),
                _add(sql, "delivery_retries", _retries(sql, "NEW"), label="NEW.destination"),
            ],
        ),
        "delivery_moved": Trigger(
            "AFTER UPDATE OF state, destination ON delivery",
            [
                _gauge(sql, "deliveries", "OLD", "destination", "state", -1),
                _gauge(sql, "deliveries", "NEW", "destination", "state", 1),
            ],
            _moved(sql, "state", "destination"),
        ),
        "delivery_attempted": Trigger(
            "AFTER UPDATE OF attempts ON delivery",
            [
                _add(
                    sql,
                    "delivery_retries",
                    f"{_retries(sql, 'NEW')} - {_retries(sql, 'OLD')}",
                    label="NEW.destination",
                )
            ],
            f"{_retries(sql, 'NEW')} > {_retries(sql, 'OLD')}",
        ),
        "delivery_deleted": Trigger(
            "AFTER DELETE ON delivery",
            [_gauge(sql, "deliveries", "OLD", "destination", "state", -1)],
        ),
        "publication_inserted": Trigger(
            "AFTER INSERT ON publication",
            [
                _gauge(sql, "publications", "NEW", "destination", "state", 1),
                *_publication_sent(sql, update=False),
            ],
        ),
        "publication_moved": Trigger(
            "AFTER UPDATE OF state, destination ON publication",
            [
                _gauge(sql, "publications", "OLD", "destination", "state", -1),
                _gauge(sql, "publications", "NEW", "destination", "state", 1),
                *_publication_sent(sql, update=True),
            ],
            _moved(sql, "state", "destination"),
        ),
        "publication_deleted": Trigger(
            "AFTER DELETE ON publication",
            [_gauge(sql, "publications", "OLD", "destination", "state", -1)],
        ),
        "association_audited": Trigger(
            "AFTER INSERT ON auditevent", _audited(sql), f"NEW.kind = {_ASSOCIATION}"
        ),
        **_index_cleanup(),
    }


def triggers(sql: Spelling = SQLITE) -> dict[str, list[str]]:
    """Every trigger this module keeps, by name: the statements that create it (SQLite: the
    trigger; PostgreSQL: its function, then the trigger)."""
    return {PREFIX + name: _created(sql, PREFIX + name, t) for name, t in _definitions(sql).items()}


def _created(sql: Spelling, name: str, trigger: Trigger) -> list[str]:
    body = "".join(f"{statement}; " for statement in trigger.statements)
    if sql is SQLITE:
        when = f" WHEN {trigger.condition}" if trigger.condition else ""
        return [f"CREATE TRIGGER {name} {trigger.event}{when} BEGIN {body}END"]
    when = f" WHEN ({trigger.condition})" if trigger.condition else ""
    return [
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$-- {trigger.event}{when}\nBEGIN {body}RETURN NULL; END$$",
        f"CREATE TRIGGER {name} {trigger.event} FOR EACH ROW{when} EXECUTE FUNCTION {name}()",
    ]


# Recounting from the rows ---------------------------------------------------------------


def _recount(sql: Spelling) -> Iterator[str]:
    """Every tally computed afresh from the rows (the triggers' statements over whole tables)."""
    for table in dict.fromkeys(("metrictally", "metricbucket", sql.series, sql.buckets)):
        yield f"DELETE FROM {table}"
    yield _add(sql, "instances_received", "1", label="NEW.calling_ae", source="instance AS NEW")
    yield _add(
        sql,
        "studies_received",
        "1",
        label="NEW.calling_ae",
        source="(SELECT DISTINCT other.calling_ae, version.study_id FROM instance AS other "
        "JOIN job AS version ON version.id = other.job_id) AS NEW",
    )
    yield _add(sql, "jobs", "1", label="NEW.state", second="NEW.priority", source="job AS NEW")
    # Each job's moments read once (its timeline parsed once), then every stage from them.
    states = sorted({state for _, start, end in STAGES for state in (start, end)})
    read = ", ".join(f"{sql.days(_moment(sql, 'NEW', state))} AS {state}" for state in states)
    yield f"CREATE TEMP TABLE moments AS SELECT {read} FROM job AS NEW"
    for stage, start, end in STAGES:
        yield from _observe(
            sql,
            "stage_seconds",
            f"'{stage}'",
            sql.greatest("0.0", f"(moments.{end} - moments.{start}) * 86400.0"),
            f"moments.{start} IS NOT NULL AND moments.{end} IS NOT NULL",
            source=f"{sql.temporary}.moments AS moments",
        )
    yield f"DROP TABLE {sql.temporary}.moments"
    live = "NOT NEW.shadow"
    yield _add(sql, "engine_answers", "1", live, label="NEW.engine", source="result AS NEW")
    yield _add(
        sql,
        "engine_positive_answers",
        answer_positive("NEW", sql),
        live,
        label="NEW.engine",
        source="result AS NEW",
    )
    yield from _observe(
        sql,
        "engine_inference_seconds",
        "NEW.engine",
        "NEW.seconds",
        "NEW.seconds IS NOT NULL",
        source="(SELECT DISTINCT engine, job_id, seconds FROM result WHERE NOT shadow) AS NEW",
    )
    for table, metric in (("delivery", "deliveries"), ("publication", "publications")):
        yield _add(
            sql,
            metric,
            "1",
            label="NEW.destination",
            second="NEW.state",
            source=f"{table} AS NEW",
        )
    yield _add(
        sql,
        "delivery_retries",
        _retries(sql, "NEW"),
        label="NEW.destination",
        source="delivery AS NEW",
    )
    yield from _audited(sql, f"NEW.kind = {_ASSOCIATION}", source="auditevent AS NEW")


# Installing -----------------------------------------------------------------------------


def install(engine: Engine) -> bool:
    """Make the database's triggers this code's; True when they were (re)made and every tally
    recounted. Cheap when they are already: one read of the schema."""
    if engine.dialect.name == POSTGRESQL.name:
        return _install_postgres(engine)
    wanted = {name: statements[0] for name, statements in triggers(SQLITE).items()}
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
        for statement in _recount(SQLITE):
            driver.execute(statement)
        driver.execute("COMMIT")
    except BaseException:
        driver.execute("ROLLBACK")
        raise
    _recounted(started, len(wanted), len(found))
    return True


def _recounted(started: float, wanted: int, replaced: int) -> None:
    log.info(
        "metrics.recounted",
        triggers=wanted,
        replaced=replaced,
        seconds=round(time.monotonic() - started, 3),
    )


# PostgreSQL keeps a function's body as written: each body begins with its trigger's event and
# condition (a comment), so comparing bodies compares everything; a trigger that went with its
# table (dropped by a revision) leaves its function out of the join, and is made again.
_POSTGRES_INSTALLED = (
    "SELECT t.tgname, p.prosrc FROM pg_trigger AS t JOIN pg_proc AS p ON p.oid = t.tgfoid "
    "WHERE NOT t.tgisinternal AND left(t.tgname, :length) = :prefix"
)


def _install_postgres(engine: Engine) -> bool:
    wanted = triggers(POSTGRESQL)
    bodies = {name: statements[0].split("$$")[1] for name, statements in wanted.items()}
    with engine.connect() as connection:
        if _postgres_installed(connection) == bodies:
            return False
    started = time.monotonic()
    with engine.begin() as connection:
        connection.execute(text(f"SELECT pg_advisory_xact_lock({INSTALL_LOCK_KEY})"))
        found = _postgres_installed(connection)  # again, now alone: another may have done it
        if found == bodies:
            return False
        for name in found:  # the trigger goes with its function
            connection.exec_driver_sql(f'DROP FUNCTION IF EXISTS "{name}"() CASCADE')
        for statements in wanted.values():
            for statement in statements:
                connection.exec_driver_sql(statement)
        for statement in _recount(POSTGRESQL):
            connection.exec_driver_sql(statement)
    _recounted(started, len(wanted), len(found))
    return True


def _postgres_installed(connection: Connection) -> dict[str, str]:
    rows = connection.execute(
        text(_POSTGRES_INSTALLED), {"length": len(PREFIX), "prefix": PREFIX}
    ).all()
    return {str(name): str(body) for name, body in rows}


# Reading, and folding PostgreSQL's changes in -------------------------------------------


def _kept(table: str, changes: str, key: str, amount: str) -> str:
    """The rows of `table`, with the changes not folded into them yet added (one statement:
    one snapshot, so a compaction committing meanwhile is seen whole or not at all)."""
    return (
        f"SELECT {key}, sum({amount}) FROM (SELECT {key}, {amount} FROM {table} "
        f"UNION ALL SELECT {key}, {amount} FROM {changes}) AS kept GROUP BY {key}"
    )


def series_query(dialect_name: str) -> str:
    """Every series: (metric, label, second_label, value) rows."""
    sql = spelling(dialect_name)
    if sql is SQLITE:
        return "SELECT metric, label, second_label, value FROM metrictally"
    return _kept("metrictally", sql.series, "metric, label, second_label", "value")


def buckets_query(dialect_name: str) -> str:
    """Every histogram bucket: (metric, label, le, count) rows."""
    sql = spelling(dialect_name)
    if sql is SQLITE:
        return "SELECT metric, label, le, count FROM metricbucket"
    return _kept("metricbucket", sql.buckets, "metric, label, le", "count")


def _fold(table: str, changes: str, key: str, amount: str) -> str:
    # Only the changes committed when the statement began go: a writer's later ones wait.
    return (
        f"WITH moved AS (DELETE FROM {changes} RETURNING {key}, {amount}) "
        f"INSERT INTO {table} ({key}, {amount}) SELECT {key}, sum({amount}) FROM moved "
        f"GROUP BY {key} ON CONFLICT ({key}) DO UPDATE SET {amount} = {table}.{amount} "
        f"+ excluded.{amount}"
    )


def compact(engine: Engine) -> int:
    """PostgreSQL: fold the changes appended since the last time into the rows, unless another
    process is doing it (or replacing the triggers); how many rows it added to. Nothing to do
    on SQLite."""
    if engine.dialect.name != POSTGRESQL.name:
        return 0
    with engine.begin() as connection:
        mine = connection.execute(text(f"SELECT pg_try_advisory_xact_lock({INSTALL_LOCK_KEY})"))
        if not mine.scalar():
            return 0
        series = connection.exec_driver_sql(
            _fold("metrictally", POSTGRESQL.series, "metric, label, second_label", "value")
        )
        buckets = connection.exec_driver_sql(
            _fold("metricbucket", POSTGRESQL.buckets, "metric, label, le", "count")
        )
    return int(series.rowcount) + int(buckets.rowcount)


class Compactor:
    """A stage of the node's conveyor: `compact` every COMPACT_EVERY_S, so the changes a
    scrape adds up stay few however long nobody scrapes."""

    name = "tallies"

    def __init__(self, engine: Engine, every_s: float = COMPACT_EVERY_S) -> None:
        self.engine = engine
        self.every_s = every_s
        self._due = 0.0

    def advance(self) -> float | None:
        if self.engine.dialect.name != POSTGRESQL.name:
            return None
        now = time.monotonic()
        if now < self._due:
            return self._due - now
        compact(self.engine)
        self._due = now + self.every_s
        return self.every_s
