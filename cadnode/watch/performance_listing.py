"""`cadnode performance [--since 30d] [--json]`: each engine version against the radiologists
(cadnode.watch.performance), as the dashboard's performance page shows it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from cadnode.core.audit import parse_since
from cadnode.core.config import Settings
from cadnode.core.db import Database, utcnow
from cadnode.feedback.labels import rules_at
from cadnode.watch.performance import Figures, Key, Proportion, read_cases, tabulate


def add_performance_command(commands: Any) -> None:
    shown = commands.add_parser(
        "performance",
        help="sensitivity, specificity, PPV, NPV of each engine version against the "
        "radiologists' feedback, per operating point",
    )
    shown.add_argument("--since", help="a time or a duration back (7d); default feedback.window")
    shown.add_argument("--json", action="store_true", help="one JSON document")


def performance_command(settings: Settings, args: argparse.Namespace) -> int:
    feedback = settings.feedback
    try:
        since = (
            parse_since(args.since)
            if args.since
            else utcnow() - dt.timedelta(seconds=feedback.window)
        )
    except ValueError as error:
        print(error)
        return 2
    database = Database(settings.database_url)
    with database.session() as session:
        cases = read_cases(
            session, rules_at(feedback.findings_file), since=since, max_rows=feedback.max_rows
        )
    rows = [_row(key, found) for key, found in tabulate(cases).items()]
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0


def _row(key: Key, found: Figures) -> dict[str, Any]:
    return {
        "engine": key.engine,
        "version": key.version,
        "finding": key.finding,
        "operating_point": key.point,
        "tp": found.tp,
        "fp": found.fp,
        "fn": found.fn,
        "tn": found.tn,
        **{name: _share(share) for name, share in found.named().items()},
    }


def _share(share: Proportion) -> dict[str, Any]:
    return {
        "value": share.value,
        "low": share.low,
        "high": share.high,
        "of": f"{share.successes}/{share.trials}",
    }


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no feedback on a study an engine answered"
    lines = [
        f"{'ENGINE':<16} {'VERSION':<10} {'FINDING':<14} {'POINT':<10} "
        f"{'TP':>4} {'FP':>4} {'FN':>4} {'TN':>4}  SENSITIVITY [95% CI]  SPECIFICITY [95% CI]"
    ]
    for row in rows:
        lines.append(
            f"{row['engine']:<16} {row['version']:<10} {row['finding']:<14} "
            f"{row['operating_point']:<10} {row['tp']:>4} {row['fp']:>4} {row['fn']:>4} "
            f"{row['tn']:>4}  {_shown(row['sensitivity']):<20}  {_shown(row['specificity'])}"
        )
    return "\n".join(lines)


def _shown(share: dict[str, Any]) -> str:
    if share["value"] is None:
        return "-"
    return f"{share['value']:.3f} [{share['low']:.3f}, {share['high']:.3f}]"
