"""/metrics from the tallies (cadnode/core/tallies.py): the same figures as counting the rows
whole, from every kind of writer (inserts, transitions, ORM updates, deletes), the same after
a recount from the rows, and a scrape that reads as much for a thousand jobs as for ten."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, delete, event, func, insert, text
from sqlmodel import col, select

from cadnode.admin import metrics
from cadnode.admin.context import AdminContext
from cadnode.core import audit
from cadnode.core.config import Settings
from cadnode.core.db import (
    AuditOutcome,
    Database,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    MetricBucket,
    MetricTally,
    Priority,
    PriorityClass,
    Publication,
    PublicationChannel,
    PublicationState,
    Result,
    Study,
    StudyPriority,
    utcnow,
)
from cadnode.core.tallies import LATENCY_BUCKETS_S, answer_positive, compact
from cadnode.infer.answers import Answer, dump_answer, parse_answer
from tests.answer_cases import detector_answer, ruleout_answer, segmenter_answer

ANSWERS: list[tuple[str, Answer]] = [
    ("cxr-ruleout", ruleout_answer(0.9)),
    ("cxr-ruleout", ruleout_answer(0.1)),
    ("cxr-segmenter", segmenter_answer(12.0)),
    ("cxr-segmenter", segmenter_answer(None)),
    ("dbt-detector", detector_answer(0.8, 0.3)),
    ("dbt-detector", detector_answer(0.3)),
    ("dbt-detector", detector_answer()),
]
Figures = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def context_for(database: Database, folder: Path) -> AdminContext:
    settings = Settings.model_validate({"storage": {"data_dir": str(folder), "min_free_mb": 1}})
    settings.storage.spool.mkdir(parents=True, exist_ok=True)
    return AdminContext(
        settings=settings,
        database=database,
        configured_engines=[],
        engines=[],
        rules=lambda: None,  # type: ignore[arg-type,return-value]  # /metrics reads no rules
    )


def scraped(context: AdminContext) -> Figures:
    figures: Figures = {}
    for family in text_string_to_metric_families(metrics.render(context).decode()):
        for sample in family.samples:
            figures[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return figures


def seed(database: Database, jobs: int, *, rng: random.Random, delete_one: bool = True) -> None:
    """A node's history: jobs inserted with timelines, then moved on by transitions; their
    instances from two modalities, engine answers (a batch sharing a call's time),
    deliveries tried, sent, dead-lettered and one deleted, priorities published, and
    associations accepted and rejected."""
    now = utcnow()
    with database.session() as session:
        for number in range(jobs):
            study = Study(study_uid=f"1.2.826.0.1.3680043.10.7.{number % (jobs // 2 + 1)}.1")
            existing = session.exec(select(Study).where(Study.study_uid == study.study_uid)).first()
            study = existing or study
            session.add(study)
            session.flush()
            started = now - dt.timedelta(seconds=rng.choice([40, 200, 900, 4000]) + 0.37)
            timeline: dict[str, str] = {}
            at = started
            for state in ("complete", "routed", "inferred", "encoded")[: rng.randint(0, 4)]:
                at += dt.timedelta(seconds=rng.choice([0.02, 0.3, 1.7, 7.3, 42.0, 333.0]))
                timeline[state] = at.isoformat()
            versions = session.exec(select(Job).where(Job.study_id == study.id)).all()
            job = Job(
                study_id=study.id,  # type: ignore[arg-type]
                version=len(versions) + 1,
                state=JobState(list(timeline)[-1]) if timeline else JobState.received,
                priority=rng.choice(list(PriorityClass)),
                first_instance_at=started,
                timeline=timeline,
            )
            session.add(job)
            session.flush()
            assert job.id is not None
            for image in range(rng.randint(1, 3)):
                session.add(
                    Instance(
                        sop_instance_uid=f"{study.study_uid}.{job.version}.{image}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                        series_uid=f"{study.study_uid}.1",
                        transfer_syntax="1.2.840.10008.1.2.1",
                        path="x.dcm",
                        size=1,
                        calling_ae=rng.choice(["MOD1", "MOD2"]),
                        peer="127.0.0.1:1",
                        job_id=job.id,
                    )
                )
            if "routed" in timeline:  # priorities published before or after the answers
                decision = StudyPriority(
                    study_id=study.id,  # type: ignore[arg-type]
                    job_id=job.id,
                    level=Priority.HIGH,
                    reason="test",
                )
                session.add(decision)
                session.flush()
                for destination in ("ris", "ups"):
                    session.add(
                        Publication(
                            study_id=study.id,  # type: ignore[arg-type]
                            decision_id=decision.id,
                            channel=PublicationChannel.hl7,
                            destination=destination,
                        )
                    )
            if "inferred" in timeline:
                call = round(rng.uniform(0.01, 5.0), 3)
                for image in range(rng.randint(1, 2)):  # one call answering a batch
                    engine, answer = rng.choice(ANSWERS)
                    session.add(
                        Result(
                            job_id=job.id,
                            engine=engine,
                            engine_version="1",
                            model_sha256="0" * 64,
                            sop_instance_uid=f"{study.study_uid}.{image}",
                            answer=dump_answer(answer),
                            seconds=call,
                        )
                    )
                    # A shadow version's answer: compared elsewhere, counted nowhere here.
                    session.add(
                        Result(
                            job_id=job.id,
                            engine=engine,
                            engine_version="2",
                            model_sha256="1" * 64,
                            sop_instance_uid=f"{study.study_uid}.{image}",
                            answer=dump_answer(rng.choice(ANSWERS)[1]),
                            seconds=round(call + 0.0005, 4),
                            shadow=True,
                        )
                    )
            if "encoded" in timeline:
                for destination in ("pacs", "archive"):
                    session.add(
                        Delivery(
                            object_uid=f"{study.study_uid}.{job.version}.sr",
                            job_id=job.id,
                            destination=destination,
                            attempts=rng.randint(0, 2),
                        )
                    )
        session.commit()
    move_on(database, rng, delete_one=delete_one)
    for outcome, reason in [("accepted", None)] * 5 + [("rejected", "unknown AE")] * 2:
        details = {"reason": reason} if reason else {}
        audit.record(
            database,
            audit.ASSOCIATION,
            actor="X",
            address="10.0.0.1:1",
            outcome=AuditOutcome(outcome),
            **details,
        )


def move_on(database: Database, rng: random.Random, *, delete_one: bool) -> None:
    """What the stages and outboxes do next: publications sent (each later than the one
    before), transitions (the timeline grows), deliveries retried, sent and dead-lettered,
    one delivery deleted."""
    nexts = {
        JobState.received: JobState.complete,
        JobState.complete: JobState.routed,
        JobState.routed: JobState.inferred,
        JobState.inferred: JobState.encoded,
        JobState.encoded: JobState.delivered,
    }
    with database.session() as session:
        sent_at = utcnow() - dt.timedelta(seconds=600)
        for publication in session.exec(select(Publication).order_by(col(Publication.id))):
            if rng.random() < 0.6:
                sent_at += dt.timedelta(seconds=rng.uniform(0.5, 20))
                publication.state = rng.choice([PublicationState.sent, PublicationState.failed])
                publication.sent_at = sent_at
                session.add(publication)
                session.commit()
        for job in session.exec(select(Job)).all():
            if rng.random() < 0.7 and job.state in nexts:
                database.transition(session, job, nexts[job.state], expect=job.state)
        for delivery in session.exec(select(Delivery)).all():
            delivery.attempts += rng.randint(0, 3)
            delivery.state = rng.choice(list(DeliveryState))
            session.add(delivery)
        session.commit()
        if delete_one:
            doomed = session.exec(select(Delivery.id).limit(1)).first()
            session.execute(delete(Delivery).where(col(Delivery.id) == doomed))
            session.commit()


def counted_whole(database: Database) -> Figures:
    """The figures as a scrape computed them before the tallies: every row read."""
    expected: Figures = defaultdict(float)

    def put(name: str, value: float, **labels: str) -> None:
        expected[(name, tuple(sorted(labels.items())))] += value

    with database.session() as session:
        for ae, count in session.exec(
            select(Instance.calling_ae, func.count()).group_by(Instance.calling_ae)
        ):
            put("cadnode_instances_received_total", count, calling_ae=ae)
        for ae, count in session.exec(
            select(Instance.calling_ae, func.count(func.distinct(Job.study_id)))
            .join(Job, col(Job.id) == col(Instance.job_id))
            .group_by(Instance.calling_ae)
        ):
            put("cadnode_studies_received_total", count, calling_ae=ae)
        states = Counter(session.exec(select(Job.state, Job.priority)).all())
        for state in JobState:
            for priority in PriorityClass:
                put(
                    "cadnode_jobs",
                    states[(state, priority)],
                    state=state.value,
                    priority=priority.value,
                )
        for stage, values in metrics.stage_seconds(metrics.job_times(session)).items():
            for bound in LATENCY_BUCKETS_S:
                within = sum(v <= bound for v in values)
                put("cadnode_stage_seconds_bucket", within, stage=stage, le=str(float(bound)))
            put("cadnode_stage_seconds_bucket", len(values), stage=stage, le="+Inf")
            put("cadnode_stage_seconds_count", len(values), stage=stage)
            put("cadnode_stage_seconds_sum", sum(values), stage=stage)
        latest: dict[str, list[bool]] = defaultdict(list)
        for engine, answer in session.exec(
            select(Result.engine, Result.answer)
            .where(col(Result.shadow).is_(False))
            .order_by(col(Result.id).desc())
        ):
            positive = parse_answer(answer).positive
            put("cadnode_engine_answers_total", 1, engine=engine)
            put("cadnode_engine_positive_answers_total", positive, engine=engine)
            latest[engine].append(positive)
        for engine, seen in latest.items():
            window = seen[: metrics.DRIFT_WINDOW]
            put("cadnode_engine_positive_rate", sum(window) / len(window), engine=engine)
        for engine, _job, seconds in session.exec(
            select(Result.engine, Result.job_id, Result.seconds)
            .where(col(Result.shadow).is_(False))
            .distinct()
        ).all():
            assert seconds is not None
            for bound in LATENCY_BUCKETS_S:
                put(
                    "cadnode_engine_inference_seconds_bucket",
                    seconds <= bound,
                    engine=engine,
                    le=str(float(bound)),
                )
            put("cadnode_engine_inference_seconds_bucket", 1, engine=engine, le="+Inf")
            put("cadnode_engine_inference_seconds_count", 1, engine=engine)
            put("cadnode_engine_inference_seconds_sum", seconds, engine=engine)
        for destination, state, count in session.exec(
            select(Delivery.destination, Delivery.state, func.count()).group_by(
                Delivery.destination, Delivery.state
            )
        ):
            put("cadnode_deliveries", count, destination=destination, state=state.value)
            if state is DeliveryState.failed:
                put("cadnode_dead_letters", count, destination=destination, outbox="results")
        for destination, state in session.exec(select(Publication.destination, Publication.state)):
            if state is PublicationState.failed:
                put("cadnode_dead_letters", 1, destination=destination, outbox="worklist")
    put("cadnode_associations_total", 5, outcome="accepted")
    put("cadnode_associations_total", 2, outcome="rejected")
    put("cadnode_association_rejections_total", 2, reason="unknown AE")
    return dict(expected)


def assert_agree(found: Figures, expected: Figures) -> None:
    for key, value in expected.items():
        assert key in found, key
        assert found[key] == pytest.approx(value, abs=0.002 * max(1.0, abs(value))), key


def test_a_scrape_gives_what_counting_every_row_gives(tmp_path: Path) -> None:
    database = Database(tmp_path / "cadnode.db")
    seed(database, 60, rng=random.Random(17))
    found = scraped(context_for(database, tmp_path))
    assert_agree(found, counted_whole(database))
    # Retries only grow: an admin's retry (attempts back to 0) takes none back.
    before = {k: v for k, v in found.items() if k[0] == "cadnode_delivery_retries_total"}
    assert before and all(value > 0 for value in before.values())
    with database.session() as session:
        session.execute(text("UPDATE delivery SET attempts = 0, state = 'pending'"))
        session.commit()
    after = scraped(context_for(database, tmp_path))
    assert {k: after[k] for k in before} == before


def test_a_recount_from_the_rows_gives_the_same_tallies(tmp_path: Path) -> None:
    """What `install` recounts after an upgrade equals what the triggers kept (where no row
    was deleted: a recount cannot count what is gone)."""
    database = Database(tmp_path / "cadnode.db")
    seed(database, 60, rng=random.Random(23), delete_one=False)
    kept = tallied(database)
    with database.engine.begin() as connection:
        connection.exec_driver_sql("DROP TRIGGER cadnode_job_moved")  # as a copied table would
    Database(tmp_path / "cadnode.db")  # opening it again puts them back, and recounts
    recounted = tallied(database)
    assert recounted.keys() == kept.keys()
    for key, value in kept.items():
        assert recounted[key] == pytest.approx(value, abs=0.002 * max(1.0, abs(value))), key


def tallied(database: Database) -> dict[tuple[Any, ...], float]:
    compact(database.engine)  # PostgreSQL's changes into the rows
    with database.session() as session:
        rows: dict[tuple[Any, ...], float] = {
            (t.metric, t.label, t.second_label): t.value
            for t in session.exec(select(MetricTally))
            if t.value
        }
        rows.update(
            {(b.metric, b.label, b.le): b.count for b in session.exec(select(MetricBucket))}
        )
    return rows


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every SQL statement run while the fixture is in use, on any engine."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    yield seen
    event.remove(Engine, "before_cursor_execute", count)


def test_a_scrape_runs_as_many_statements_for_a_thousand_jobs_as_for_ten(
    tmp_path: Path, statements: list[str]
) -> None:
    ran = {}
    for jobs in (10, 1000):
        folder = tmp_path / str(jobs)
        database = Database(folder / "cadnode.db")
        bulk_seed(database, jobs)
        context = context_for(database, folder)
        statements.clear()
        scraped(context)
        ran[jobs] = list(statements)
        assert any("metrictally" in s for s in ran[jobs])
    assert len(ran[1000]) == len(ran[10])
    assert all("FROM job" not in s and "FROM instance" not in s for s in ran[1000])


def bulk_seed(database: Database, jobs: int) -> None:
    """`jobs` delivered jobs of one instance, answer and delivery each, written at once."""
    now = utcnow()
    timeline = {s: (now + dt.timedelta(seconds=i)).isoformat() for i, s in enumerate(STATES)}
    with database.session() as session:
        session.execute(insert(Study), [{"study_uid": f"1.2.3.{n}"} for n in range(jobs)])
        session.execute(
            insert(Job),
            [
                {
                    "study_id": n + 1,
                    "version": 1,
                    "state": JobState.delivered,
                    "priority": PriorityClass.routine,
                    "first_instance_at": now,
                    "last_instance_at": now,
                    "updated_at": now,
                    "timeline": timeline,
                    "pipeline": [],
                    "inputs": [],
                }
                for n in range(jobs)
            ],
        )
        rows = [(n, f"1.2.3.{n}.1") for n in range(jobs)]
        session.execute(
            insert(Instance),
            [
                {
                    "sop_instance_uid": uid,
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
                    "series_uid": uid,
                    "transfer_syntax": "1.2.840.10008.1.2.1",
                    "path": "x.dcm",
                    "size": 1,
                    "calling_ae": "MOD1",
                    "peer": "",
                    "job_id": n + 1,
                }
                for n, uid in rows
            ],
        )
        engine, answer = ANSWERS[0]
        session.execute(
            insert(Result),
            [
                {
                    "job_id": n + 1,
                    "engine": engine,
                    "engine_version": "1",
                    "model_sha256": "0",
                    "sop_instance_uid": uid,
                    "answer": dump_answer(answer),
                    "seconds": 0.2,
                }
                for n, uid in rows
            ],
        )
        session.execute(
            insert(Delivery),
            [
                {"object_uid": uid, "job_id": n + 1, "destination": "pacs", "state": "sent"}
                for n, uid in rows
            ],
        )
        session.commit()


STATES = ("complete", "routed", "inferred", "encoded", "delivered")


def test_positive_in_sql_is_the_answers_own(tmp_path: Path) -> None:
    database = Database(tmp_path / "cadnode.db")
    positive = text(
        f"SELECT {answer_positive('answered')} FROM (SELECT :answer AS answer) AS answered"
    )
    assert {answer.positive for _, answer in ANSWERS} == {True, False}
    with database.session() as session:
        for engine, answer in ANSWERS:
            stored = json.dumps(dump_answer(answer))
            found = session.execute(positive, {"answer": stored}).scalar()
            assert bool(found) is answer.positive, engine
