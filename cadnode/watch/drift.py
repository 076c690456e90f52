"""Drift statistics: is what a sender sends an engine, and what the engine answers, still what
it was? Pure functions of samples; the database side is `drift_check.py`.

A sample is a window of one sender's images for one engine: each input attribute's category
per image (cadnode.infer.profile: manufacturer, model, pixel spacing, kVp, body part,
photometric interpretation, image size), whether the answer was positive, the bin of its
probability, and the probabilities. It is compared with a baseline, a reference window of
the same sender and engine or the training population of the bundle's manifest:

- each attribute's categories, the positive rate and the probability histogram by the
  population stability index, PSI = sum over categories of (a - e) ln(a / e), with shares
  under EPSILON taken as EPSILON (a category new to one side counts, without dividing by 0).
  Convention: under 0.1 stable, 0.1 to 0.25 worth watching, over 0.25 shifted;
- the probabilities by Kolmogorov-Smirnov: two samples against a reference window
  (scipy.stats.ks_2samp), one sample against the training population's distribution, which
  its manifest gives as percentiles (scipy.stats.kstest on their piecewise-linear CDF).

Each figure has a level (ok, watch, alert) by `drift.*` thresholds; an alert is raised when
any figure reaches "alert", and once raised holds while any is at "watch" or over.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cadnode.core.config import DriftSettings
from cadnode.infer.bundle import Population
from cadnode.infer.profile import ATTRIBUTES, PROBABILITY_BINS

EPSILON = 1e-4  # the share an absent category counts as
POSITIVE, PROBABILITY = "positive", "probability"
COMPARED = (*ATTRIBUTES, POSITIVE, PROBABILITY)  # compared by PSI, in this order
PSI, KS = "psi", "ks"
OK, WATCH, ALERT = "ok", "watch", "alert"


def shares(categories: Iterable[str]) -> dict[str, float]:
    counts = Counter(categories)
    total = sum(counts.values())
    return {category: n / total for category, n in counts.items()} if total else {}


def psi(expected: Mapping[str, float], actual: Mapping[str, float]) -> float:
    """The population stability index of `actual` shares against `expected` ones."""
    total = 0.0
    for category in set(expected) | set(actual):
        e = max(expected.get(category, 0.0), EPSILON)
        a = max(actual.get(category, 0.0), EPSILON)
        total += (a - e) * math.log(a / e)
    return total


def ks_two_samples(reference: Sequence[float], current: Sequence[float]) -> tuple[float, float]:
    """Kolmogorov-Smirnov's D and two-sided p-value of two samples."""
    # scipy's import costs a second: paid here, not by every `cadnode` command.
    from scipy import stats

    result = stats.ks_2samp(reference, current)
    return float(result.statistic), float(result.pvalue)


def ks_against_percentiles(
    current: Sequence[float], percentiles: Sequence[float]
) -> tuple[float, float]:
    """D and p-value of `current` against the distribution whose 0, 5, ..., 100th
    percentiles are `percentiles` (linear between them)."""
    levels = np.linspace(0, 1, len(percentiles))
    points = np.asarray(percentiles, dtype=float)

    def cdf(x: np.ndarray) -> np.ndarray:
        return np.asarray(np.interp(x, points, levels, left=0.0, right=1.0))

    from scipy import stats

    result = stats.kstest(np.asarray(current, dtype=float), cdf)
    return float(result.statistic), float(result.pvalue)


@dataclass(frozen=True)
class Sample:
    """A window of one sender's images for one engine."""

    categories: Mapping[str, Sequence[str]]  # each of COMPARED: one category per image
    probabilities: Sequence[float]

    @property
    def images(self) -> int:
        return len(self.categories.get(ATTRIBUTES[0], ()))

    def shares(self, attribute: str) -> dict[str, float] | None:
        return shares(self.categories.get(attribute, ()))

    def ks(self, probabilities: Sequence[float]) -> tuple[float, float] | None:
        if not self.probabilities or not probabilities:
            return None
        return ks_two_samples(self.probabilities, probabilities)


class Baseline(Protocol):
    """What a sample is compared with: a reference window, or a training population."""

    @property
    def images(self) -> int: ...

    def shares(self, attribute: str) -> dict[str, float] | None:
        """The attribute's shares; None where the baseline does not know them."""

    def ks(self, probabilities: Sequence[float]) -> tuple[float, float] | None:
        """D and p-value of `probabilities` against the baseline's."""


@dataclass(frozen=True)
class TrainingBaseline:
    """The training population a bundle's manifest records."""

    population: Population

    @property
    def images(self) -> int:
        return self.population.images

    def shares(self, attribute: str) -> dict[str, float] | None:
        population = self.population
        if attribute == POSITIVE:
            rate = population.positive_rate
            return {"yes": rate, "no": 1 - rate}
        if attribute == PROBABILITY:
            edges = (f"{i / PROBABILITY_BINS:.1f}" for i in range(PROBABILITY_BINS))
            return dict(zip(edges, population.probability_histogram, strict=True))
        return population.metadata.get(attribute)

    def ks(self, probabilities: Sequence[float]) -> tuple[float, float] | None:
        if not probabilities:
            return None
        return ks_against_percentiles(probabilities, self.population.probability_quantiles)


@dataclass(frozen=True)
class Figure:
    """One statistic of a sample against a baseline."""

    attribute: str
    statistic: str  # PSI or KS
    against: str  # "reference" or "training"
    value: float  # the PSI, or KS's D
    p_value: float | None  # KS only
    level: str  # OK, WATCH or ALERT

    def text(self) -> str:
        """As alerts and tables say it: "pixel_spacing PSI 9.21", "probability KS 0.62 (p
        0.0003)"."""
        p = "" if self.p_value is None else f" (p {self.p_value:.2g})"
        return f"{self.attribute} {self.statistic.upper()} {self.value:.3g}{p}"


def compare(
    current: Sample, baseline: Baseline, against: str, settings: DriftSettings
) -> list[Figure]:
    """Every figure of `current` against `baseline`: PSI of each attribute the baseline
    knows, then KS of the probabilities."""
    figures = []
    for attribute in COMPARED:
        expected, actual = baseline.shares(attribute), current.shares(attribute)
        if expected and actual:
            value = psi(expected, actual)
            figures.append(
                Figure(attribute, PSI, against, value, None, _psi_level(value, settings))
            )
    tested = baseline.ks(current.probabilities)
    if tested is not None:
        d, p = tested
        figures.append(Figure(PROBABILITY, KS, against, d, p, _ks_level(p, settings)))
    return figures


def drifting(figures: Iterable[Figure], *, raised: bool) -> list[Figure]:
    """The figures that raise an alert (at ALERT) or, once it is raised, keep it (at WATCH
    or over)."""
    held: Callable[[Figure], bool] = (
        (lambda f: f.level != OK) if raised else (lambda f: f.level == ALERT)
    )
    return [figure for figure in figures if held(figure)]


def _psi_level(value: float, settings: DriftSettings) -> str:
    if value >= settings.psi_alert:
        return ALERT
    return WATCH if value >= settings.psi_watch else OK


def _ks_level(p: float, settings: DriftSettings) -> str:
    if p < settings.ks_p_alert:
        return ALERT
    return WATCH if p < settings.ks_p_clear else OK
