"""Drift as people and Prometheus see it: `cadnode engines drift [NAME]` (computed afresh),
the `cadnode_drift_*` gauges and the dashboard's table (the last check's DriftStat rows)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func
from sqlmodel import Session, col, select

from cadnode.core.config import Settings
from cadnode.core.db import Database, DriftStat, utcnow
from cadnode.watch.drift import KS, OK, PSI
from cadnode.watch.drift_check import Assessment, assess, populations

LABELS = ["sender", "engine", "attribute", "against"]
SHOWN = 500  # the dashboard's table: figures at watch or alert, at most


def add_drift_command(actions: Any) -> None:
    """`cadnode engines drift`, under the engines command's actions."""
    drift = actions.add_parser(
        "drift",
        help="each sender's inputs and answers against the reference window and the "
        "training population: PSI, KS, level",
    )
    drift.add_argument("name", nargs="?", metavar="NAME", help="default: every engine")
    drift.add_argument("--json", action="store_true", help="one JSON document")


def drift_command(settings: Settings, args: argparse.Namespace) -> int:
    with Database(settings.database_url).session() as session:
        assessed = assess(session, settings.drift, populations(settings.engines.dir), utcnow())
    rows = [
        row for found in assessed if args.name in (None, found.engine) for row in rows_of(found)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(table(rows))
    else:
        least = settings.drift.min_images
        print(f"nothing to compare: no sender has {least} images (drift.min_images) for an engine")
    return 0


def rows_of(found: Assessment) -> list[dict[str, Any]]:
    return [
        {
            "sender": found.sender,
            "engine": found.engine,
            "version": found.version,
            "images": found.images,
            "against": figure.against,
            "baseline_images": found.baselines[figure.against][0],
            "attribute": figure.attribute,
            "statistic": figure.statistic,
            "value": round(figure.value, 6),
            "p_value": None if figure.p_value is None else float(f"{figure.p_value:.6g}"),
            "level": figure.level,
        }
        for figure in found.figures
    ]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'SENDER':<16} {'ENGINE':<16} {'VERSION':<10} {'IMAGES':>6} {'AGAINST':<10} "
        f"{'ATTRIBUTE':<14} {'STAT':<4} {'VALUE':>9} {'P':>9} LEVEL"
    ]
    for row in rows:
        p = "" if row["p_value"] is None else f"{row['p_value']:.3g}"
        lines.append(
            f"{row['sender']:<16} {row['engine']:<16} {row['version']:<10} {row['images']:>6} "
            f"{row['against']:<10} {row['attribute']:<14} {row['statistic']:<4} "
            f"{row['value']:>9.4f} {p:>9} {row['level']}"
        )
    return "\n".join(lines)


def drift_metrics(session: Session) -> Iterator[GaugeMetricFamily]:
    """The last check's figures: a series per sender, engine, attribute and baseline."""
    psi = GaugeMetricFamily(
        "cadnode_drift_psi", "Population stability index at the last drift check", labels=LABELS
    )
    ks = GaugeMetricFamily(
        "cadnode_drift_ks", "Kolmogorov-Smirnov D of the probabilities", labels=LABELS
    )
    ks_p = GaugeMetricFamily(
        "cadnode_drift_ks_pvalue", "Kolmogorov-Smirnov p-value of the probabilities", labels=LABELS
    )
    for stat in session.exec(select(DriftStat)):
        labels = [stat.sender, stat.engine, stat.attribute, stat.against]
        if stat.statistic == PSI:
            psi.add_metric(labels, stat.value)
        elif stat.statistic == KS:
            ks.add_metric(labels, stat.value)
            ks_p.add_metric(labels, stat.p_value if stat.p_value is not None else 1.0)
    yield from (psi, ks, ks_p)


def drift_table(session: Session) -> tuple[list[DriftStat], int]:
    """For the dashboard: the last check's figures at watch or alert (alerts first), and how
    many others are ok."""
    shown = list(
        session.exec(
            select(DriftStat)
            .where(col(DriftStat.level) != OK)
            .order_by(col(DriftStat.level), col(DriftStat.engine), col(DriftStat.sender))
            .limit(SHOWN)
        )
    )
    ok = session.exec(
        select(func.count()).select_from(DriftStat).where(col(DriftStat.level) == OK)
    ).one()
    return shown, ok
