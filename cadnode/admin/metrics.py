"""GET /metrics: Prometheus metrics, computed from the database at each scrape.

Every stage writes what it did to the database, so reading the figures from there makes all
processes and stages agree and needs nothing reaching into a stage. Counters are counts of
rows that are never deleted; where a row can change back (an admin retrying a dead letter
resets its attempts) Prometheus sees a counter reset, as it would after a restart. What the
database has no table for is taken from the audit trail (association rejections).

Per-stage latency is read from each job's timeline (`Job.timeline`, written by
`Database.transition`): the time from the state before to the state reached.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func
from sqlmodel import Session, col, select

from cadnode import __version__
from cadnode.admin.context import AdminContext
from cadnode.core import audit
from cadnode.core.audit import aware
from cadnode.core.db import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    PriorityClass,
    Publication,
    PublicationState,
    Result,
    StudyPriority,
)
from cadnode.infer.answers import parse_answer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (stage, from state, to state): how long each step of the flow took. "published" is the
# worklist priority reaching its first recipient, counted from the engines' answer.
STAGES = (
    ("complete", "received", JobState.complete.value),
    ("routed", JobState.complete.value, JobState.routed.value),
    ("inferred", JobState.routed.value, JobState.inferred.value),
    ("encoded", JobState.inferred.value, JobState.encoded.value),
    ("delivered", JobState.encoded.value, JobState.delivered.value),
    ("published", JobState.inferred.value, "published"),
    ("total", "received", JobState.delivered.value),
)
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# The positive rate of each engine over its latest answers: a drift signal.
DRIFT_WINDOW = 200


def render(context: AdminContext) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(context))
    return generate_latest(registry)


class DatabaseCollector(Collector):
    def __init__(self, context: AdminContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("cadnode_info", "The node's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        with self.context.database.session() as session:
            yield from _received(session)
            yield from _associations(session)
            yield from _queues(session)
            yield from _latencies(session)
            yield from _engines(session)
            yield from _outboxes(session)
        yield from self._disk()

    def _disk(self) -> Iterator[Metric]:
        storage = self.context.settings.storage
        free = GaugeMetricFamily(
            "cadnode_disk_free_bytes", "Free space where the spool lies", labels=["path"]
        )
        free.add_metric(["spool"], shutil.disk_usage(storage.spool).free)
        yield free
        yield GaugeMetricFamily(
            "cadnode_disk_min_free_bytes",
            "The watermark below which C-STORE is refused (storage.min_free_mb)",
            value=storage.min_free_mb * 2**20,
        )


def _received(session: Session) -> Iterator[Metric]:
    instances = CounterMetricFamily(
        "cadnode_instances_received", "Instances stored, by calling AE title", labels=["calling_ae"]
    )
    for calling_ae, count in session.exec(
        select(Instance.calling_ae, func.count()).group_by(Instance.calling_ae)
    ):
        instances.add_metric([calling_ae], count)
    yield instances
    studies = CounterMetricFamily(
        "cadnode_studies_received", "Studies received, by calling AE title", labels=["calling_ae"]
    )
    for calling_ae, count in session.exec(
        select(Instance.calling_ae, func.count(func.distinct(Job.study_id)))
        .join(Job, Job.id == Instance.job_id)  # type: ignore[arg-type]
        .group_by(Instance.calling_ae)
    ):
        studies.add_metric([calling_ae], count)
    yield studies


def _associations(session: Session) -> Iterator[Metric]:
    """From the audit trail. Rejections are labelled by reason only: a hostile peer chooses
    its calling AE title, and must not be able to mint label values."""
    events = session.exec(
        select(AuditEvent.outcome, AuditEvent.details).where(AuditEvent.kind == audit.ASSOCIATION)
    )
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for outcome, details in events:
        outcomes[outcome] += 1
        if outcome == "rejected":
            reasons[str(details.get("reason", "unknown"))] += 1
    associations = CounterMetricFamily(
        "cadnode_associations", "Association requests, by outcome", labels=["outcome"]
    )
    for outcome in ("accepted", "rejected"):
        associations.add_metric([outcome], outcomes[outcome])
    yield associations
    rejections = CounterMetricFamily(
        "cadnode_association_rejections",
        "Association requests rejected, by reason",
        labels=["reason"],
    )
    for reason, count in sorted(reasons.items()):
        rejections.add_metric([reason], count)
    yield rejections


def _queues(session: Session) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "cadnode_jobs",
        "Jobs in each state (a stage's queue) and priority class",
        labels=["state", "priority"],
    )
    counts = {
        (state, priority): count
        for state, priority, count in session.exec(
            select(Job.state, Job.priority, func.count()).group_by(Job.state, Job.priority)
        )
    }
    for state in JobState:
        for priority in PriorityClass:
            depth.add_metric([state.value, priority.value], counts.get((state, priority), 0))
    yield depth


def job_times(session: Session, job_id: int | None = None) -> list[dict[str, dt.datetime]]:
    """Each job's moments (or one job's): received (its first instance), each state it
    entered, and the first time its priority reached a recipient."""
    first_sent = (
        select(StudyPriority.job_id, func.min(Publication.sent_at))
        .join(Publication, Publication.decision_id == StudyPriority.id)  # type: ignore[arg-type]
        .where(Publication.state == PublicationState.sent)
        .group_by(col(StudyPriority.job_id))
    )
    jobs = select(Job.id, Job.first_instance_at, Job.timeline)
    if job_id is not None:
        first_sent = first_sent.where(StudyPriority.job_id == job_id)
        jobs = jobs.where(Job.id == job_id)
    published = {job: sent for job, sent in session.exec(first_sent)}
    times = []
    for job_id, first_instance_at, timeline in session.exec(jobs):
        moments = {"received": aware(first_instance_at)}
        for state, at in timeline.items():
            moments[state] = aware(dt.datetime.fromisoformat(at))
        sent = published.get(job_id)
        if sent is not None:
            moments["published"] = aware(sent)
        times.append(moments)
    return times


def stage_seconds(times: Iterable[dict[str, dt.datetime]]) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {stage: [] for stage, _, _ in STAGES}
    for moments in times:
        for stage, start, end in STAGES:
            if start in moments and end in moments:
                seconds[stage].append(max((moments[end] - moments[start]).total_seconds(), 0.0))
    return seconds


def _latencies(session: Session) -> Iterator[Metric]:
    histogram = HistogramMetricFamily(
        "cadnode_stage_seconds",
        "Time each step of the flow took, per job (total: first instance to delivered)",
        labels=["stage"],
    )
    for stage, values in stage_seconds(job_times(session)).items():
        _add_histogram(histogram, [stage], values)
    yield histogram


def _add_histogram(family: HistogramMetricFamily, labels: list[str], values: list[float]) -> None:
    buckets = [(_bucket_label(b), sum(v <= b for v in values)) for b in LATENCY_BUCKETS_S]
    buckets.append(("+Inf", len(values)))
    family.add_metric(labels, buckets, sum(values))


def _bucket_label(bound: float) -> str:
    return str(float(bound))


def _engines(session: Session) -> Iterator[Metric]:
    answers: Counter[str] = Counter()
    positives: Counter[str] = Counter()
    recent: dict[str, list[bool]] = defaultdict(list)
    rows = session.exec(
        select(Result.engine, Result.answer).order_by(Result.id.desc())  # type: ignore[union-attr]
    )
    for engine, answer in rows:
        positive = parse_answer(answer).positive  # reached an operating point
        answers[engine] += 1
        positives[engine] += positive
        if len(recent[engine]) < DRIFT_WINDOW:
            recent[engine].append(positive)
    total = CounterMetricFamily(
        "cadnode_engine_answers", "Answers given, per engine", labels=["engine"]
    )
    positive_total = CounterMetricFamily(
        "cadnode_engine_positive_answers",
        "Answers that reached an operating point (not ruled out, a finding reported)",
        labels=["engine"],
    )
    rate = GaugeMetricFamily(
        "cadnode_engine_positive_rate",
        f"Share of positive answers among each engine's latest {DRIFT_WINDOW} (drift signal)",
        labels=["engine"],
    )
    for engine in sorted(answers):
        total.add_metric([engine], answers[engine])
        positive_total.add_metric([engine], positives[engine])
        rate.add_metric([engine], sum(recent[engine]) / len(recent[engine]))
    yield from (total, positive_total, rate)
    yield _inference_seconds(session)


def _inference_seconds(session: Session) -> Metric:
    """Each engine call's time, per engine (a batched call answers several images at once)."""
    histogram = HistogramMetricFamily(
        "cadnode_engine_inference_seconds",
        "Time of each engine call (reading the images, preprocessing, the model, post-processing)",
        labels=["engine"],
    )
    calls = session.exec(
        select(Result.engine, Result.job_id, Result.seconds)
        .where(col(Result.seconds).is_not(None))
        .distinct()
    ).all()
    by_engine: dict[str, list[float]] = defaultdict(list)
    for engine, _job, seconds in calls:
        if seconds is not None:
            by_engine[engine].append(seconds)
    for engine, values in sorted(by_engine.items()):
        _add_histogram(histogram, [engine], values)
    return histogram


def _outboxes(session: Session) -> Iterator[Metric]:
    deliveries = GaugeMetricFamily(
        "cadnode_deliveries",
        "Result deliveries, by destination and state",
        labels=["destination", "state"],
    )
    retries = CounterMetricFamily(
        "cadnode_delivery_retries",
        "Delivery attempts after the first, by destination",
        labels=["destination"],
    )
    dead = GaugeMetricFamily(
        "cadnode_dead_letters",
        "Deliveries given up on, awaiting an admin's retry or discard",
        labels=["outbox", "destination"],
    )
    retried: Counter[str] = Counter()
    for destination, state, count, attempts in session.exec(
        select(
            Delivery.destination,
            Delivery.state,
            func.count(),
            func.sum(case((col(Delivery.attempts) > 1, col(Delivery.attempts) - 1), else_=0)),
        ).group_by(Delivery.destination, Delivery.state)
    ):
        deliveries.add_metric([destination, str(state)], count)
        retried[destination] += int(attempts or 0)
        if state == DeliveryState.failed:
            dead.add_metric(["results", destination], count)
    for destination, count in sorted(retried.items()):
        retries.add_metric([destination], count)
    for destination, count in session.exec(
        select(Publication.destination, func.count())
        .where(Publication.state == PublicationState.failed)
        .group_by(Publication.destination)
    ):
        dead.add_metric(["worklist", destination], count)
    yield from (deliveries, retries, dead)
