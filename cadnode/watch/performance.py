"""How well each engine version agrees with the radiologists: sensitivity, specificity, PPV
and NPV with exact intervals, at each operating point, overall and week by week.

The truth is the radiologists' conclusions (cadnode.feedback: Feedback rows; the latest
per job and finding counts, an uncertain one is left out). The prediction is the engine's
answer for the same job: at each operating point of its manifest, positive when the
answer reached it (`PointReached.reached`) for any of the job's images, for the statement
whose label is that finding (by code or name: config/feedback.yaml). A study is one case.

`figures` and `tabulate` are pure; `read_cases` reads the database within a window and a
row limit (`feedback.window`, `feedback.max_rows`), so the dashboard and a scrape cost a
bounded amount whatever the history.

Intervals are Clopper-Pearson (exact, two-sided 95 %): the beta quantiles of the binomial
proportion, as scipy.stats.binomtest(...).proportion_ci(method="exact") gives them.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlmodel import Session, col, select

from cadnode.core.audit import aware
from cadnode.core.config import FeedbackSettings
from cadnode.core.db import Conclusion, Feedback, Result, utcnow
from cadnode.feedback.labels import FeedbackRules, rules_at
from cadnode.infer.answers import parse_answer

CONFIDENCE = 0.95
_CHUNK = 500  # job ids per IN (...) query


@dataclass(frozen=True)
class Key:
    """What one table row is about."""

    engine: str
    version: str
    finding: str
    point: str  # the operating point's name in the manifest


@dataclass(frozen=True)
class Case:
    """One study: what the engine version said at one operating point, and the truth."""

    key: Key
    job_id: int
    predicted: bool
    truth: bool
    answered_at: dt.datetime


@dataclass(frozen=True)
class Proportion:
    successes: int
    trials: int
    value: float | None  # None: no trials
    low: float | None
    high: float | None


@dataclass(frozen=True)
class Figures:
    """A 2x2 table and what it gives."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def cases(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def sensitivity(self) -> Proportion:
        return proportion(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> Proportion:
        return proportion(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> Proportion:
        return proportion(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> Proportion:
        return proportion(self.tn, self.tn + self.fn)

    def named(self) -> dict[str, Proportion]:
        return {
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "ppv": self.ppv,
            "npv": self.npv,
        }


def proportion(successes: int, trials: int, confidence: float = CONFIDENCE) -> Proportion:
    """successes / trials with its exact (Clopper-Pearson) interval."""
    if trials == 0:
        return Proportion(successes, trials, None, None, None)
    # scipy's import costs a second: paid here, not by every `cadnode` command.
    from scipy.stats import beta

    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = (
        1.0
        if successes == trials
        else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return Proportion(successes, trials, successes / trials, low, high)


def figures(cases: Iterable[Case]) -> Figures:
    counts = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    for case in cases:
        counts[(case.predicted, case.truth)] += 1
    return Figures(
        tp=counts[(True, True)],
        fp=counts[(True, False)],
        fn=counts[(False, True)],
        tn=counts[(False, False)],
    )


def tabulate(cases: Iterable[Case]) -> dict[Key, Figures]:
    """Figures per engine, version, finding and operating point, in that order."""
    grouped: dict[Key, list[Case]] = defaultdict(list)
    for case in cases:
        grouped[case.key].append(case)
    return {key: figures(grouped[key]) for key in sorted(grouped, key=_order)}


def by_week(cases: Iterable[Case]) -> dict[Key, dict[dt.date, Figures]]:
    """The same, per week (Monday, UTC) of the engine's answer: how it goes over time."""
    grouped: dict[Key, dict[dt.date, list[Case]]] = defaultdict(lambda: defaultdict(list))
    for case in cases:
        day = aware(case.answered_at).date()
        grouped[case.key][day - dt.timedelta(days=day.weekday())].append(case)
    return {
        key: {week: figures(grouped[key][week]) for week in sorted(grouped[key])}
        for key in sorted(grouped, key=_order)
    }


def _order(key: Key) -> tuple[str, str, str, str]:
    return (key.engine, key.version, key.finding, key.point)


# -- from the database ----------------------------------------------------------------------


def read_cases(
    session: Session,
    rules: FeedbackRules,
    *,
    since: dt.datetime,
    max_rows: int,
) -> list[Case]:
    """The cases of the conclusions received since `since` (at most the latest `max_rows`)."""
    truths = latest_truths(session, since=since, max_rows=max_rows)
    jobs = sorted({job for job, _ in truths})
    cases: dict[tuple[Key, int], Case] = {}
    for start in range(0, len(jobs), _CHUNK):
        chunk = jobs[start : start + _CHUNK]
        results = session.exec(select(Result).where(col(Result.job_id).in_(chunk)))
        for result in results:
            for case in _result_cases(result, rules, truths):
                cases[(case.key, case.job_id)] = _either(cases.get((case.key, case.job_id)), case)
    return list(cases.values())


def latest_truths(
    session: Session, *, since: dt.datetime, max_rows: int
) -> dict[tuple[int, str], bool]:
    """(job, finding) -> present, from the latest conclusion of each (uncertain: left out)."""
    rows = session.exec(
        select(Feedback.job_id, Feedback.finding, Feedback.conclusion)
        .where(Feedback.received_at >= since)
        .order_by(col(Feedback.id).desc())
        .limit(max_rows)
    )
    truths: dict[tuple[int, str], bool] = {}
    seen: set[tuple[int, str]] = set()
    for job_id, finding, conclusion in rows:
        if (job_id, finding) in seen:
            continue  # an older conclusion, since replaced
        seen.add((job_id, finding))
        if conclusion is not Conclusion.uncertain:
            truths[(job_id, finding)] = conclusion is Conclusion.present
    return truths


def _result_cases(
    result: Result, rules: FeedbackRules, truths: dict[tuple[int, str], bool]
) -> Iterable[Case]:
    for statement in parse_answer(result.answer).statements():
        finding = rules.finding_of(statement.label)
        truth = None if finding is None else truths.get((result.job_id, finding))
        if finding is None or truth is None:
            continue
        for point, reached in statement.operating_points.items():
            key = Key(result.engine, result.engine_version, finding, point)
            yield Case(key, result.job_id, reached.reached, truth, result.created_at)


def _either(earlier: Case | None, case: Case) -> Case:
    """A study is positive when any of its images (any statement) reached the point."""
    if earlier is None:
        return case
    return Case(
        case.key,
        case.job_id,
        earlier.predicted or case.predicted,
        case.truth,
        min(earlier.answered_at, case.answered_at),
    )


# -- as Prometheus metrics ------------------------------------------------------------------

# A scrape reads the figures at most this often; between, it repeats the last ones.
METRICS_EVERY_S = 60.0
_last: dict[str, tuple[float, dict[Key, Figures]]] = {}


def performance_metrics(session: Session, settings: FeedbackSettings) -> Iterator[Metric]:
    """cadnode_engine_{sensitivity,specificity,ppv,npv}{engine,version,finding,
    operating_point} over `feedback.window`, with the interval's bounds and the studies
    counted; read within the window's row limit, at most once a minute per database."""
    table = _table(session, settings)
    labels = ["engine", "version", "finding", "operating_point"]
    studies = GaugeMetricFamily(
        "cadnode_feedback_studies",
        "Studies with a radiologist's conclusion, per engine version, finding and point",
        labels=labels,
    )
    families = {
        name: [
            GaugeMetricFamily(f"cadnode_engine_{name}{suffix}", f"{text} ({what})", labels=labels)
            for suffix, what in (
                ("", "value"),
                ("_low", "exact 95% interval, lower bound"),
                ("_high", "exact 95% interval, upper bound"),
            )
        ]
        for name, text in (
            ("sensitivity", "Sensitivity against the radiologists"),
            ("specificity", "Specificity against the radiologists"),
            ("ppv", "Positive predictive value against the radiologists"),
            ("npv", "Negative predictive value against the radiologists"),
        )
    }
    for key, found in table.items():
        values = [key.engine, key.version, key.finding, key.point]
        studies.add_metric(values, found.cases)
        for name, share in found.named().items():
            if share.value is None or share.low is None or share.high is None:
                continue
            for family, number in zip(
                families[name], (share.value, share.low, share.high), strict=True
            ):
                family.add_metric(values, number)
    yield studies
    for triple in families.values():
        yield from triple


def _table(session: Session, settings: FeedbackSettings) -> dict[Key, Figures]:
    where = str(session.get_bind().engine.url)
    now = time.monotonic()
    cached = _last.get(where)
    if cached is not None and now - cached[0] < METRICS_EVERY_S:
        return cached[1]
    since = utcnow() - dt.timedelta(seconds=settings.window)
    rules = rules_at(settings.findings_file)
    table = tabulate(read_cases(session, rules, since=since, max_rows=settings.max_rows))
    _last[where] = (now, table)
    return table
