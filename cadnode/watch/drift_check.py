"""Drift checks on the database: which senders and engines to compare, their windows of
InputProfile rows, the training populations of the installed bundles, and the findings the
watch stage turns into alerts (statistics: `drift.py`).

Every `drift.check_every`, for each sender and engine with images over the last
`drift.window` (live answers only, the busiest `drift.max_series` pairs), the engine version
that answered last is compared:

- against its reference window: with `drift.reference: first`, the version's first
  `reference_images` images from the sender (the current window is then what came after
  them, so nothing is compared until the reference is full), or the images of a fixed
  window {start, end} (the current window is what came after its end);
- against the training population of that version's manifest (`population`), where it has
  one and `drift.training` is on.

The current window is the most recent `window_images` of those images within `window`; a
window of fewer than `min_images` is not compared. The figures of each check replace the
last in DriftStat (what /metrics, the dashboard read); the findings name the sender, the
engine, each attribute over its threshold with its statistic and value, never a patient.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from sqlalchemy import ColumnElement, delete, func
from sqlmodel import Session, col, select

from cadnode.core.audit import aware
from cadnode.core.config import DriftReferenceWindow, DriftSettings, Settings
from cadnode.core.db import AlertKind, DriftStat, InputProfile
from cadnode.core.yamlfile import ConfigError, load_model
from cadnode.infer.bundle import MANIFEST, Manifest, Population
from cadnode.infer.profile import NONE, InputFacts, probability_bin
from cadnode.watch.drift import (
    COMPARED,
    POSITIVE,
    PROBABILITY,
    Baseline,
    Figure,
    Sample,
    TrainingBaseline,
    compare,
    drifting,
)
from cadnode.watch.findings import Finding, OpenAlerts, moment

REFERENCE, TRAINING = "reference", "training"
Populations = dict[tuple[str, str], Population]  # by (engine, version)


@dataclass(frozen=True)
class Assessment:
    """One sender and engine version: its current window against each baseline."""

    sender: str
    engine: str
    version: str
    images: int
    first_at: dt.datetime | None  # the current window's first image
    baselines: dict[str, tuple[int, str]] = field(default_factory=dict)  # images, in words
    figures: list[Figure] = field(default_factory=list)

    @property
    def subject(self) -> str:
        return f"{self.sender}/{self.engine}"


class DriftWatch:
    """The watch stage's drift detector, on its own clock (`drift.check_every`): between
    checks it reports the last check's findings, so an alert holds until a check ends it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.drift
        self.engines_dir = settings.engines.dir
        self._next_check: dt.datetime | None = None
        self._found: list[Finding] = []

    def findings(self, session: Session, now: dt.datetime, watched: OpenAlerts) -> list[Finding]:
        """Check when due (writing the figures to DriftStat; the caller commits)."""
        if not self.settings.enabled:
            return []
        if self._next_check is not None and now < self._next_check:
            return self._found
        self._next_check = now + dt.timedelta(seconds=self.settings.check_every)
        assessed = assess(session, self.settings, populations(self.engines_dir), now)
        store(session, assessed, now)
        found = (finding_of(each, watched, now) for each in assessed)
        self._found = [finding for finding in found if finding is not None]
        return self._found


def populations(engines_dir: Path) -> Populations:
    """The training population of every installed bundle that records one. Manifests only:
    the daemon verified the bundles at start, and a check must not hash model files."""
    found: Populations = {}
    for path in sorted(engines_dir.glob(f"*/{MANIFEST}")):
        try:
            manifest = load_model(path, Manifest)
        except ConfigError:
            continue  # refused where it is loaded; nothing to compare with here
        if manifest.population is not None:
            found[(manifest.name, manifest.version)] = manifest.population
    return found


def assess(
    session: Session, settings: DriftSettings, known: Populations, now: dt.datetime
) -> list[Assessment]:
    """Every sender and engine with images in the window, compared with its baselines."""
    since = now - dt.timedelta(seconds=settings.window)
    busiest = session.exec(
        select(func.max(InputProfile.id))
        .where(col(InputProfile.shadow).is_(False), col(InputProfile.created_at) >= since)
        .group_by(col(InputProfile.sender), col(InputProfile.engine))
        .order_by(func.count().desc())
        .limit(settings.max_series)
    ).all()
    assessed = []
    for last_id in busiest:
        last = session.get(InputProfile, last_id)
        assert last is not None
        found = _assess(session, settings, known, last, since)
        if found is not None:
            assessed.append(found)
    return sorted(assessed, key=lambda a: (a.engine, a.sender))


def _assess(
    session: Session,
    settings: DriftSettings,
    known: Populations,
    last: InputProfile,
    since: dt.datetime,
) -> Assessment | None:
    reference, after_id, after_at, words = _reference(session, settings, last)
    current = _current(
        session, settings, last, max(since, after_at) if after_at else since, after_id
    )
    if len(current) < settings.min_images:
        return None
    sample = sample_of(current)
    baselines: dict[str, tuple[Baseline, str]] = {}
    if len(reference) >= settings.min_images:
        baselines[REFERENCE] = (sample_of(reference), words)
    population = known.get((last.engine, last.engine_version))
    if settings.training and population is not None:
        baselines[TRAINING] = (TrainingBaseline(population), "the training population")
    return Assessment(
        sender=last.sender,
        engine=last.engine,
        version=last.engine_version,
        images=len(current),
        first_at=aware(current[-1].created_at),
        baselines={name: (base.images, text) for name, (base, text) in baselines.items()},
        figures=[
            figure
            for name, (base, _) in baselines.items()
            for figure in compare(sample, base, name, settings)
        ],
    )


def _series(last: InputProfile, *, same_version: bool) -> list[ColumnElement[bool]]:
    where = [
        col(InputProfile.sender) == last.sender,
        col(InputProfile.engine) == last.engine,
        col(InputProfile.shadow).is_(False),
    ]
    if same_version:
        where.append(col(InputProfile.engine_version) == last.engine_version)
    return where


def _reference(
    session: Session, settings: DriftSettings, last: InputProfile
) -> tuple[list[InputProfile], int, dt.datetime | None, str]:
    """The reference window's rows, and where the current window starts after it (an id
    and a time; 0 and None: anywhere), and the window in words."""
    window = settings.reference
    if isinstance(window, DriftReferenceWindow):
        rows = session.exec(
            select(InputProfile)
            .where(
                *_series(last, same_version=False),
                col(InputProfile.created_at) >= window.start,
                col(InputProfile.created_at) < window.end,
            )
            .order_by(col(InputProfile.id))
            .limit(settings.reference_images)
        ).all()
        words = f"the reference window {moment(window.start)} to {moment(window.end)}"
        return list(rows), 0, window.end, words
    rows = session.exec(
        select(InputProfile)
        .where(*_series(last, same_version=True))
        .order_by(col(InputProfile.id))
        .limit(settings.reference_images)
    ).all()
    if len(rows) < settings.reference_images:  # still filling: training alone, meanwhile
        return [], 0, None, ""
    words = f"the first {len(rows)} images of {last.engine} {last.engine_version}"
    return list(rows), rows[-1].id or 0, None, words


def _current(
    session: Session,
    settings: DriftSettings,
    last: InputProfile,
    since: dt.datetime,
    after_id: int,
) -> list[InputProfile]:
    """The current window, newest first."""
    return list(
        session.exec(
            select(InputProfile)
            .where(
                *_series(last, same_version=True),
                col(InputProfile.created_at) >= since,
                col(InputProfile.id) > after_id,
            )
            .order_by(col(InputProfile.id).desc())
            .limit(settings.window_images)
        ).all()
    )


def sample_of(rows: Sequence[InputProfile]) -> Sample:
    """The categories and probabilities of profiled images."""
    categories: dict[str, list[str]] = {name: [] for name in COMPARED}
    probabilities = []
    names = [f.name for f in fields(InputFacts)]
    for row in rows:
        facts = InputFacts(**{name: getattr(row, name) for name in names})
        for name, category in facts.categories().items():
            categories[name].append(category)
        positive = NONE if row.positive is None else "yes" if row.positive else "no"
        categories[POSITIVE].append(positive)
        if row.probability is None:
            categories[PROBABILITY].append(NONE)
        else:
            categories[PROBABILITY].append(probability_bin(row.probability))
            probabilities.append(row.probability)
    return Sample(categories, probabilities)


def finding_of(found: Assessment, watched: OpenAlerts, now: dt.datetime) -> Finding | None:
    """An alert's condition when a figure crosses its threshold (or, once raised, holds)."""
    open_row = watched.get((AlertKind.engine_drift, found.subject))
    raised = open_row is not None and open_row.raised_at is not None
    over = drifting(found.figures, raised=raised)
    if not over:
        return None
    parts = []
    for against, (images, words) in found.baselines.items():
        named = [figure.text() for figure in over if figure.against == against]
        if named:
            parts.append(f"against {words} ({images} images): " + ", ".join(named))
    detail = (
        f"{found.engine} {found.version} on images from {found.sender}, the last "
        f"{found.images} since {moment(found.first_at)}: " + "; ".join(parts)
    )
    since = aware(open_row.since) if open_row is not None else now
    return Finding(AlertKind.engine_drift, found.subject, detail, since)


def store(session: Session, assessed: Sequence[Assessment], now: dt.datetime) -> None:
    """Replace the figures of the last check with these (the caller commits)."""
    session.execute(delete(DriftStat))
    for found in assessed:
        for figure in found.figures:
            session.add(
                DriftStat(
                    sender=found.sender,
                    engine=found.engine,
                    attribute=figure.attribute,
                    statistic=figure.statistic,
                    against=figure.against,
                    engine_version=found.version,
                    value=figure.value,
                    p_value=figure.p_value,
                    level=figure.level,
                    images=found.images,
                    baseline_images=found.baselines[figure.against][0],
                    checked_at=now,
                )
            )
