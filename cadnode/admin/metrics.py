"""GET /metrics: Prometheus metrics, read from the database at each scrape.

Every stage writes what it did to the database, so reading the figures from there makes all
processes and stages agree and needs nothing reaching into a stage. A scrape reads no table
whole: counters, gauges and histograms are tallies the database keeps itself, one row per
series, updated by triggers in the commit of each change they count (cadnode/core/tallies.py:
instances received, association requests from the audit trail, each job's state and each
step's time as its timeline grows, engine answers, deliveries and publications), so its
cost is the number of series, not of jobs. Counters only grow (a row deleted by housekeeping,
or an admin's retry setting a delivery's attempts back, takes nothing back). The drift gauge
reads each engine's latest answers by index.
The agreement of each shadow version with the live one (cadnode/watch/agreement.py) is
computed at most every 5 minutes per engine, over its latest 1000 shadow answers of the last
7 days, and cached between.

Per-stage latency is observed from each job's timeline (`Job.timeline`, written by
`Database.transition`): the time from the state before to the state reached, once both are
known.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, text
from sqlmodel import Session, col, select

from cadnode import __version__
from cadnode.admin.context import AdminContext
from cadnode.core.audit import aware
from cadnode.core.db import (
    AuditOutcome,
    DeliveryState,
    Job,
    JobState,
    PriorityClass,
    Publication,
    PublicationState,
    StudyPriority,
)
from cadnode.core.tallies import (
    INF,
    LATENCY_BUCKETS_S,
    STAGES,
    answer_positive,
    buckets_query,
    series_query,
    spelling,
)
from cadnode.retain.metrics import removed_metrics
from cadnode.watch.agreement import agreement_metrics
from cadnode.watch.drift_listing import drift_metrics
from cadnode.watch.listing import alert_metrics
from cadnode.watch.performance import performance_metrics

__all__ = ["CONTENT_TYPE", "STAGES", "job_times", "render", "stage_seconds"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The positive rate of each engine over its latest answers: a drift signal.
DRIFT_WINDOW = 200


def render(context: AdminContext) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(context))
    return generate_latest(registry)


@dataclass
class Tallies:
    """Every tally series and histogram bucket, as the triggers keep them."""

    series: dict[str, dict[tuple[str, str], float]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    buckets: dict[str, dict[str, dict[float, int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict))
    )

    @classmethod
    def read(cls, session: Session) -> Tallies:
        tallies = cls()
        dialect = session.get_bind().dialect.name
        for metric, label, second, value in session.execute(text(series_query(dialect))):
            tallies.series[metric][(label, second)] = float(value)
        for metric, label, le, count in session.execute(text(buckets_query(dialect))):
            tallies.buckets[metric][label][float(le)] = int(count)
        return tallies

    def of(self, metric: str) -> dict[str, float]:
        """A one-label metric's series, in label order."""
        return {label: value for (label, _), value in sorted(self.series[metric].items())}


class DatabaseCollector(Collector):
    def __init__(self, context: AdminContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("cadnode_info", "The node's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        with self.context.database.session() as session:
            tallies = Tallies.read(session)
            yield from _received(tallies)
            yield from _associations(tallies)
            yield from _queues(tallies)
            yield from _latencies(tallies)
            yield from _engines(session, tallies)
            yield from _outboxes(tallies)
            yield from removed_metrics(session)
            yield from alert_metrics(session)
            # Against the radiologists' feedback (cadnode.watch.performance: bounded, cached).
            yield from performance_metrics(session, self.context.settings.feedback)
            yield from drift_metrics(session)  # the last drift check's figures
        yield from self._disk()
        # Live against shadow: over a fixed window, cached (cadnode/watch/agreement.py).
        context = self.context
        yield from agreement_metrics(
            context.database, context.configured_engines, context.settings.storage.answers
        )

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


def _received(tallies: Tallies) -> Iterator[Metric]:
    instances = CounterMetricFamily(
        "cadnode_instances_received", "Instances stored, by calling AE title", labels=["calling_ae"]
    )
    for calling_ae, count in tallies.of("instances_received").items():
        instances.add_metric([calling_ae], count)
    yield instances
    studies = CounterMetricFamily(
        "cadnode_studies_received", "Studies received, by calling AE title", labels=["calling_ae"]
    )
    for calling_ae, count in tallies.of("studies_received").items():
        studies.add_metric([calling_ae], count)
    yield studies


def _associations(tallies: Tallies) -> Iterator[Metric]:
    """From the audit trail. Rejections are labelled by reason only: a hostile peer chooses
    its calling AE title, and must not be able to mint label values."""
    outcomes = {_value(AuditOutcome, k): v for k, v in tallies.of("associations").items()}
    associations = CounterMetricFamily(
        "cadnode_associations", "Association requests, by outcome", labels=["outcome"]
    )
    for outcome in (AuditOutcome.accepted, AuditOutcome.rejected):
        associations.add_metric([outcome.value], outcomes.get(outcome.value, 0))
    yield associations
    rejections = CounterMetricFamily(
        "cadnode_association_rejections",
        "Association requests rejected, by reason",
        labels=["reason"],
    )
    for reason, count in tallies.of("association_rejections").items():
        rejections.add_metric([reason], count)
    yield rejections


def _queues(tallies: Tallies) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "cadnode_jobs",
        "Jobs in each state (a stage's queue) and priority class",
        labels=["state", "priority"],
    )
    counts = {
        (_value(JobState, state), _value(PriorityClass, priority)): count
        for (state, priority), count in tallies.series["jobs"].items()
    }
    for state in JobState:
        for priority in PriorityClass:
            depth.add_metric(
                [state.value, priority.value], counts.get((state.value, priority.value), 0)
            )
    yield depth


def job_times(session: Session, job_id: int | None = None) -> list[dict[str, dt.datetime]]:
    """Each job's moments (or one job's): received (its first instance), each state it
    entered, and the first time its priority reached a recipient. (The dashboard's; a
    scrape reads the tallies instead.)"""
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


def _latencies(tallies: Tallies) -> Iterator[Metric]:
    histogram = HistogramMetricFamily(
        "cadnode_stage_seconds",
        "Time each step of the flow took, per job (total: first instance to delivered)",
        labels=["stage"],
    )
    sums = tallies.of("stage_seconds_sum")
    for stage, _, _ in STAGES:
        _add_histogram(
            histogram, [stage], tallies.buckets["stage_seconds"][stage], sums.get(stage, 0.0)
        )
    yield histogram


def _add_histogram(
    family: HistogramMetricFamily, labels: list[str], counts: dict[float, int], total: float
) -> None:
    """Cumulative counts by upper bound (a bound with no row has seen nothing yet)."""
    buckets = [(str(float(bound)), counts.get(float(bound), 0)) for bound in LATENCY_BUCKETS_S]
    buckets.append(("+Inf", counts.get(INF, 0)))
    family.add_metric(labels, buckets, total)


def _engines(session: Session, tallies: Tallies) -> Iterator[Metric]:
    answers = tallies.of("engine_answers")
    positives = tallies.of("engine_positive_answers")
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
    for engine, count in answers.items():
        total.add_metric([engine], count)
        positive_total.add_metric([engine], positives.get(engine, 0))
        latest = _positive_rate(session, engine)
        if latest is not None:
            rate.add_metric([engine], latest)
    yield from (total, positive_total, rate)
    yield _inference_seconds(tallies)


def _positive_rate(session: Session, engine: str) -> float | None:
    """The share of positives among the engine's latest answers (by the index on engine)."""
    latest = (  # the live versions' answers: a shadow one is not what the node reports
        "SELECT answer FROM result WHERE engine = :engine AND NOT shadow "
        "ORDER BY id DESC LIMIT :window"
    )
    sql = spelling(session.get_bind().dialect.name)
    statement = text(f"SELECT avg({answer_positive('latest', sql)}) FROM ({latest}) AS latest")
    found = session.execute(statement, {"engine": engine, "window": DRIFT_WINDOW}).scalar()
    return None if found is None else float(found)


def _inference_seconds(tallies: Tallies) -> Metric:
    """Each engine call's time, per engine (a batched call answers several images at once)."""
    histogram = HistogramMetricFamily(
        "cadnode_engine_inference_seconds",
        "Time of each engine call (reading the images, preprocessing, the model, post-processing)",
        labels=["engine"],
    )
    sums = tallies.of("engine_inference_seconds_sum")
    for engine, counts in sorted(tallies.buckets["engine_inference_seconds"].items()):
        _add_histogram(histogram, [engine], counts, sums.get(engine, 0.0))
    return histogram


def _outboxes(tallies: Tallies) -> Iterator[Metric]:
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
    for (destination, stored), count in sorted(tallies.series["deliveries"].items()):
        state = _value(DeliveryState, stored)
        if count:
            deliveries.add_metric([destination, state], count)
        if count and state == DeliveryState.failed:
            dead.add_metric(["results", destination], count)
    for destination, count in tallies.of("delivery_retries").items():
        retries.add_metric([destination], count)
    for (destination, stored), count in sorted(tallies.series["publications"].items()):
        if count and _value(PublicationState, stored) == PublicationState.failed:
            dead.add_metric(["worklist", destination], count)
    yield from (deliveries, retries, dead)


def _value(kind: type[StrEnum], stored: str) -> str:
    """A stored enum (SQLite holds the member's name) as the value labels use."""
    member = kind.__members__.get(stored)
    return member.value if member is not None else stored
