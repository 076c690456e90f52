"""The removal counters of /metrics, read from the tally each removal adds to in its own
commit (RemovedTally): a row per kind and reason, whatever the size of the store."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from sqlmodel import Session, col, select

from cadnode.core.db import RemovedTally


def removed_metrics(session: Session) -> Iterator[Metric]:
    objects = CounterMetricFamily(
        "cadnode_retention_removed_objects",
        "Objects housekeeping removed (images, results, answers, job rows, audit events), "
        "by kind and reason (age, disk)",
        labels=["kind", "reason"],
    )
    size = CounterMetricFamily(
        "cadnode_retention_removed_bytes",
        "Bytes of files housekeeping removed, by kind and reason",
        labels=["kind", "reason"],
    )
    tallies = session.exec(
        select(RemovedTally).order_by(col(RemovedTally.kind), col(RemovedTally.reason))
    )
    for tally in tallies:
        objects.add_metric([tally.kind, tally.reason], tally.objects)
        size.add_metric([tally.kind, tally.reason], tally.bytes)
    yield from (objects, size)
