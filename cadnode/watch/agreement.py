"""Agreement of an engine's shadow versions with its live one, on the same images.

A shadow version answers the same job's same image as the live one (`Result.shadow`, same
`job_id`, `sop_instance_uid` and `engine`, another `engine_version`). Each such pair of
answers is compared (`pair_figures`), and the pairs of a window summed up (`summarise`):

- classify (and a detector's image-level verdict): at each operating point of the manifest,
  the 2x2 table of the two versions' decisions (reached or not), the share of images where
  they agree (p_o) and Cohen's kappa = (p_o - p_e) / (1 - p_e), p_e the agreement expected
  by chance from each version's own rate; and the probability difference, shadow minus live:
  mean, mean absolute, largest absolute, and Bland-Altman limits of agreement (mean +- 1.96
  sample SD);
- segment: Dice per label, 2|A n B| / (|A| + |B|), from the masks (`save_masks` files under
  the answers folder); a label both versions left empty is an agreement, counted apart, and
  the mean counts it as 1 (seed 001's convention), the mean over the rest is shown beside;
- detect: boxes matched by the FROC rule (cadnode.infer.froc_rule), the live box as the
  reference, one to one, nearest hit first: matched, only live, only shadow.

The reads (`comparisons`) are apart from the figures, which are pure. `comparison_text` is
what `cadnode engines compare` and `cadnode engines promote` print; `agreement_metrics` what
/metrics reports, over a fixed window and cached (see METRICS_*).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

import numpy as np
import sqlalchemy as sql
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import TypeAdapter, ValidationError
from sqlmodel import Session, col

from cadnode.core.audit import aware
from cadnode.core.config import Duration, Settings
from cadnode.core.db import Database, Result, utcnow
from cadnode.infer.answers import (
    Answer,
    ClassifyAnswer,
    DetectAnswer,
    DetectFinding,
    PointReached,
    SegmentAnswer,
    load_masks,
    parse_answer,
)
from cadnode.infer.froc_rule import Region, distance_3d, is_hit
from cadnode.retain.usage import duration_text

# The most shadow answers one comparison reads (the latest): bounds a command's and a page's
# memory and time whatever the window.
MAX_PAIRS = 5000
# /metrics: the last 7 days, at most the latest 1000 shadow answers per engine, computed at
# most once every 5 minutes per engine (a scrape in between reads the cache).
METRICS_WINDOW = dt.timedelta(days=7)
METRICS_MAX_PAIRS = 1000
METRICS_CACHE_S = 300.0
LIMITS_Z = 1.96  # Bland-Altman: 95 % limits of agreement
HISTOGRAM_EDGE = 0.5  # the difference histogram spans -0.5 .. 0.5; beyond, the end bins
HISTOGRAM_BINS = 20
_IN_CHUNK = 500  # job ids per IN (...) query: well under every database's bound

MaskReader = Callable[[SegmentAnswer], np.ndarray | None]


# -- the figures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """Two versions' decisions on the same images: reached by both, by one, by neither."""

    both: int = 0
    live_only: int = 0
    shadow_only: int = 0
    neither: int = 0

    @classmethod
    def of(cls, decisions: Iterable[tuple[bool, bool]]) -> Table:
        counts = Counter(decisions)
        return cls(
            both=counts[(True, True)],
            live_only=counts[(True, False)],
            shadow_only=counts[(False, True)],
            neither=counts[(False, False)],
        )

    @property
    def images(self) -> int:
        return self.both + self.live_only + self.shadow_only + self.neither

    @property
    def agreement(self) -> float | None:
        """p_o: the share of images both decided alike."""
        return (self.both + self.neither) / self.images if self.images else None

    @property
    def expected(self) -> float | None:
        """p_e: the agreement expected by chance from each version's own positive rate."""
        n = self.images
        if not n:
            return None
        live, shadow = self.both + self.live_only, self.both + self.shadow_only
        return (live * shadow + (n - live) * (n - shadow)) / n**2

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa; None where chance alone agrees fully (both versions constant)."""
        observed, expected = self.agreement, self.expected
        if observed is None or expected is None or expected == 1:
            return None
        return (observed - expected) / (1 - expected)


@dataclass(frozen=True)
class Differences:
    """Probability differences, shadow minus live."""

    images: int
    mean: float
    mean_absolute: float
    max_absolute: float
    limits: tuple[float, float] | None  # mean -+ 1.96 SD; None under two images

    @classmethod
    def of(cls, differences: Sequence[float]) -> Differences | None:
        if not differences:
            return None
        mean = fmean(differences)
        spread = LIMITS_Z * stdev(differences) if len(differences) > 1 else None
        return cls(
            images=len(differences),
            mean=mean,
            mean_absolute=fmean(abs(d) for d in differences),
            max_absolute=max(abs(d) for d in differences),
            limits=None if spread is None else (mean - spread, mean + spread),
        )


def dice(live: np.ndarray, shadow: np.ndarray) -> float | None:
    """2|A n B| / (|A| + |B|); None when both are empty (an agreement, counted apart)."""
    total = int(live.sum()) + int(shadow.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(live, shadow).sum()) / total


@dataclass(frozen=True)
class DiceSummary:
    images: int
    both_empty: int
    mean: float  # over every image, both empty counting 1
    mean_drawn: float | None  # over the images where either version drew something

    @classmethod
    def of(cls, values: Sequence[float | None]) -> DiceSummary:
        drawn = [v for v in values if v is not None]
        both_empty = len(values) - len(drawn)
        return cls(
            images=len(values),
            both_empty=both_empty,
            mean=(sum(drawn) + both_empty) / len(values) if values else math.nan,
            mean_drawn=fmean(drawn) if drawn else None,
        )


@dataclass(frozen=True)
class BoxCounts:
    live: int = 0
    shadow: int = 0
    matched: int = 0

    @property
    def only_live(self) -> int:
        return self.live - self.matched

    @property
    def only_shadow(self) -> int:
        return self.shadow - self.matched

    def __add__(self, other: BoxCounts) -> BoxCounts:
        return BoxCounts(
            self.live + other.live, self.shadow + other.shadow, self.matched + other.matched
        )


def _region(finding: DetectFinding) -> Region:
    """A finding as the FROC rule sees a prediction: centred on first slice + depth / 2
    (slices counted from 0, as the Duke CSVs do)."""
    box = finding.box
    return Region(box.x, box.y, box.width, box.height, box.first_frame - 1 + box.depth / 2)


def match_boxes(
    live: Sequence[DetectFinding], shadow: Sequence[DetectFinding], frames: int
) -> BoxCounts:
    """Shadow boxes matched one to one to live boxes of the same label by the FROC rule
    (live as the reference; slice tolerance a quarter of the volume's frames), nearest
    pairs first; a second shadow box on a live box already matched is only-shadow."""
    offset = frames / 4.0
    candidates = sorted(
        (distance_3d(_region(s), _region(v)), i, j)
        for i, v in enumerate(live)
        for j, s in enumerate(shadow)
        if v.label.name == s.label.name and is_hit(_region(s), _region(v), offset)
    )
    used_live: set[int] = set()
    used_shadow: set[int] = set()
    for _, i, j in candidates:
        if i not in used_live and j not in used_shadow:
            used_live.add(i)
            used_shadow.add(j)
    return BoxCounts(len(live), len(shadow), len(used_live))


@dataclass(frozen=True)
class PairedAnswer:
    """The live and a shadow version's answers on one image; `at` when the shadow answered."""

    live: Answer
    shadow: Answer
    at: dt.datetime


@dataclass(frozen=True)
class PairFigures:
    """What one pair of answers contributes to a summary."""

    at: dt.datetime
    decisions: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # point: live, shadow
    # A multi-label classifier's findings' points, as "LABEL POINT": live, shadow.
    finding_decisions: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    difference: float | None = None  # probability, shadow minus live
    dice: dict[str, float | None] = field(default_factory=dict)  # label: Dice, None both empty
    masks_unread: bool = False
    boxes: BoxCounts | None = None


def pair_figures(pair: PairedAnswer, masks: MaskReader) -> PairFigures:
    live, shadow = pair.live, pair.shadow
    if isinstance(live, SegmentAnswer) and isinstance(shadow, SegmentAnswer):
        found = _segment_dice(live, shadow, masks)
        return PairFigures(pair.at, dice=found or {}, masks_unread=found is None)
    if isinstance(live, SegmentAnswer) or isinstance(shadow, SegmentAnswer):
        return PairFigures(pair.at)  # a task changed between versions: nothing in common
    boxes = None
    if isinstance(live, DetectAnswer) and isinstance(shadow, DetectAnswer):
        boxes = match_boxes(live.findings, shadow.findings, live.frames)
    return PairFigures(
        pair.at,
        decisions=_both_reached(live.operating_points, shadow.operating_points),
        finding_decisions=_finding_decisions(live, shadow),
        difference=shadow.probability - live.probability,
        boxes=boxes,
    )


def _finding_decisions(
    live: ClassifyAnswer | DetectAnswer, shadow: ClassifyAnswer | DetectAnswer
) -> dict[str, tuple[bool, bool]]:
    """A multi-label classifier's findings both versions name: at each of their points,
    whether each version reached it."""
    if not (isinstance(live, ClassifyAnswer) and isinstance(shadow, ClassifyAnswer)):
        return {}
    theirs = {finding.label.name: finding for finding in shadow.findings}
    decided: dict[str, tuple[bool, bool]] = {}
    for mine in live.findings:
        if (other := theirs.get(mine.label.name)) is not None:
            points = _both_reached(mine.operating_points, other.operating_points)
            decided |= {f"{mine.label.name} {name}": both for name, both in points.items()}
    return decided


def _both_reached(
    live: dict[str, PointReached], shadow: dict[str, PointReached]
) -> dict[str, tuple[bool, bool]]:
    """At each operating point both versions' manifests name, whether each reached it."""
    shared = sorted(live.keys() & shadow.keys())
    return {name: (live[name].reached, shadow[name].reached) for name in shared}


def _segment_dice(
    live: SegmentAnswer, shadow: SegmentAnswer, masks: MaskReader
) -> dict[str, float | None] | None:
    """Dice per label both versions segment; None when either's masks cannot be read."""
    live_masks, shadow_masks = masks(live), masks(shadow)
    if live_masks is None or shadow_masks is None or live_masks.shape[0] != shadow_masks.shape[0]:
        return None
    if live_masks.shape[2:] != shadow_masks.shape[2:]:
        return None
    by_label = {f.label.name: f.segment_number - 1 for f in shadow.findings}
    return {
        f.label.name: dice(
            live_masks[:, f.segment_number - 1], shadow_masks[:, by_label[f.label.name]]
        )
        for f in live.findings
        if f.label.name in by_label
    }


@dataclass(frozen=True)
class Summary:
    images: int
    points: dict[str, Table]  # the answer's own operating points
    finding_points: dict[str, Table]  # a multi-label classifier's, "LABEL POINT"
    probability: Differences | None
    dice: dict[str, DiceSummary]
    masks_unread: int
    boxes: BoxCounts | None

    @property
    def all_points(self) -> dict[str, Table]:
        """The answer's own points, then its findings'."""
        return {**self.points, **self.finding_points}


def summarise(figures: Sequence[PairFigures]) -> Summary:
    dices: dict[str, list[float | None]] = defaultdict(list)
    boxes: BoxCounts | None = None
    for one in figures:
        for label, value in one.dice.items():
            dices[label].append(value)
        if one.boxes is not None:
            boxes = one.boxes if boxes is None else boxes + one.boxes
    return Summary(
        images=len(figures),
        points=_tables(one.decisions for one in figures),
        finding_points=_tables(one.finding_decisions for one in figures),
        probability=Differences.of([f.difference for f in figures if f.difference is not None]),
        dice={label: DiceSummary.of(values) for label, values in sorted(dices.items())},
        masks_unread=sum(f.masks_unread for f in figures),
        boxes=boxes,
    )


def _tables(decisions: Iterable[dict[str, tuple[bool, bool]]]) -> dict[str, Table]:
    by_point: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for decided in decisions:
        for point, both in decided.items():
            by_point[point].append(both)
    return {point: Table.of(both) for point, both in sorted(by_point.items())}


def by_day(figures: Sequence[PairFigures]) -> list[tuple[dt.date, Summary]]:
    """A summary per UTC day the shadow answered, oldest first."""
    days: dict[dt.date, list[PairFigures]] = defaultdict(list)
    for one in figures:
        days[aware(one.at).astimezone(dt.UTC).date()].append(one)
    return [(day, summarise(days[day])) for day in sorted(days)]


def difference_histogram(figures: Sequence[PairFigures]) -> list[tuple[str, int]]:
    """Counts of probability differences in HISTOGRAM_BINS bins over -0.5 .. 0.5 (the end
    bins take what lies beyond), labelled by each bin's lower edge."""
    width = 2 * HISTOGRAM_EDGE / HISTOGRAM_BINS
    counts = [0] * HISTOGRAM_BINS
    for one in figures:
        if one.difference is not None:
            # Rounded first: 0.6 / 0.05 is 11.999... in floating point, and 0.1 belongs in 12.
            index = math.floor(round((one.difference + HISTOGRAM_EDGE) / width, 9))
            counts[min(max(index, 0), HISTOGRAM_BINS - 1)] += 1
    return [(f"{-HISTOGRAM_EDGE + i * width:+.2f}", n) for i, n in enumerate(counts)]


# -- the reads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One shadow version against the live version it ran beside, over a window."""

    engine: str
    live_version: str
    shadow_version: str
    figures: list[PairFigures]
    summary: Summary


@dataclass(frozen=True)
class Comparisons:
    engine: str
    since: dt.datetime
    pairs: list[Comparison]
    unpaired: int  # shadow answers whose image has no live answer (yet)
    truncated: bool  # more shadow answers in the window than were read (the latest were)


def mask_reader(answers: Path | None) -> MaskReader:
    """Reads an answer's masks under the answers folder; None when it is gone (retention)
    or no folder is known."""

    def read(answer: SegmentAnswer) -> np.ndarray | None:
        if answers is None:
            return None
        try:
            return load_masks(answers / answer.mask_file)
        except (OSError, ValueError, KeyError):
            return None

    return read


def comparisons(
    database: Database,
    engine: str,
    since: dt.datetime,
    *,
    answers: Path | None = None,
    limit: int = MAX_PAIRS,
) -> Comparisons:
    """Each shadow version of `engine` against the live one, over the shadow answers given
    since `since` (at most `limit`, the latest)."""
    with database.session() as session:
        shadows = _shadow_rows(session, engine, since, limit + 1)
        truncated = len(shadows) > limit
        shadows = shadows[:limit]
        live = _live_rows(session, engine, sorted({row.job_id for row in shadows}))
    grouped: dict[tuple[str, str], list[PairedAnswer]] = defaultdict(list)
    unpaired = 0
    for row in reversed(shadows):  # oldest first
        partner = live.get((row.job_id, row.sop_instance_uid))
        if partner is None:
            unpaired += 1
            continue
        pair = PairedAnswer(parse_answer(partner.answer), parse_answer(row.answer), row.created_at)
        grouped[(partner.engine_version, row.engine_version)].append(pair)
    read = mask_reader(answers)
    found = []
    for (live_version, shadow_version), pairs in sorted(grouped.items()):
        figures = [pair_figures(pair, read) for pair in pairs]
        found.append(Comparison(engine, live_version, shadow_version, figures, summarise(figures)))
    return Comparisons(engine, since, found, unpaired, truncated)


# What a comparison reads of a Result: columns, not ORM objects (a third of the time).
_ANSWERED = tuple(
    col(column)
    for column in (
        Result.job_id,
        Result.sop_instance_uid,
        Result.engine_version,
        Result.answer,
        Result.created_at,
    )
)


def _shadow_rows(session: Session, engine: str, since: dt.datetime, most: int) -> list[Any]:
    query = (
        sql.select(*_ANSWERED)
        .where(
            col(Result.engine) == engine,
            col(Result.shadow).is_(True),
            col(Result.created_at) >= since,
        )
        .order_by(col(Result.id).desc())
        .limit(most)
    )
    return list(session.execute(query))


def _live_rows(session: Session, engine: str, job_ids: Sequence[int]) -> dict[tuple[int, str], Any]:
    """The live answers of these jobs by (job, image); the latest where there are several."""
    live: dict[tuple[int, str], Any] = {}
    for start in range(0, len(job_ids), _IN_CHUNK):
        query = (
            sql.select(*_ANSWERED)
            .where(
                col(Result.engine) == engine,
                col(Result.shadow).is_(False),
                col(Result.job_id).in_(job_ids[start : start + _IN_CHUNK]),
            )
            .order_by(col(Result.id))
        )
        for row in session.execute(query):
            live[(row.job_id, row.sop_instance_uid)] = row
    return live


# -- as text --------------------------------------------------------------------------------


def comparison_text(
    database: Database,
    engine: str,
    since: dt.timedelta,
    *,
    answers: Path | None = None,
    now: dt.datetime | None = None,
) -> str:
    """Each shadow version of `engine` against the live one over the last `since`, a table
    each. Segment Dice needs `answers` (the answers folder, `StorageSettings.answers`)."""
    found = comparisons(database, engine, (now or utcnow()) - since, answers=answers)
    window = f"last {duration_text(since)}"
    if not found.pairs:
        return f"{engine}: no shadow answer beside a live one in the {window}" + _notes(found)
    blocks = [_comparison_block(one, window, answers is not None) for one in found.pairs]
    return "\n\n".join(blocks) + _notes(found)


def _notes(found: Comparisons) -> str:
    notes = []
    if found.unpaired:
        notes.append(f"{found.unpaired} shadow answer(s) without a live answer on the same image")
    if found.truncated:
        notes.append(f"only the latest {MAX_PAIRS} shadow answers were compared")
    return "".join(f"\n({note})" for note in notes)


def _comparison_block(one: Comparison, window: str, masks_known: bool) -> str:
    summary = one.summary
    lines = [
        f"{one.engine}: live {one.live_version} vs shadow {one.shadow_version}, {window}: "
        f"{summary.images} image(s) answered by both"
    ]
    if summary.all_points:
        lines += ["", *point_lines(summary.all_points)]
    if summary.probability is not None:
        lines += ["", difference_line(summary.probability)]
    if summary.dice or summary.masks_unread:
        lines += ["", *dice_lines(summary, masks_known)]
    if summary.boxes is not None:
        lines += ["", box_line(summary.boxes)]
    return "\n".join(lines)


def _figure(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def point_lines(points: dict[str, Table]) -> list[str]:
    lines = [
        f"{'OPERATING POINT':<24} {'IMAGES':>6} {'AGREE':>6} {'KAPPA':>6} {'BOTH':>5} "
        f"{'LIVE ONLY':>9} {'SHADOW ONLY':>11} {'NEITHER':>7}"
    ]
    for name, table in points.items():
        lines.append(
            f"{name:<24} {table.images:>6} {_figure(table.agreement):>6} "
            f"{_figure(table.kappa):>6} {table.both:>5} {table.live_only:>9} "
            f"{table.shadow_only:>11} {table.neither:>7}"
        )
    return lines


def difference_line(found: Differences) -> str:
    limits = ""
    if found.limits is not None:
        limits = f", limits of agreement {found.limits[0]:+.3f} .. {found.limits[1]:+.3f}"
    return (
        f"probability, shadow - live: mean {found.mean:+.3f}, mean |d| {found.mean_absolute:.3f}, "
        f"max |d| {found.max_absolute:.3f}{limits}"
    )


def dice_lines(summary: Summary, masks_known: bool) -> list[str]:
    lines = [f"{'LABEL':<16} {'IMAGES':>6} {'MEAN DICE':>9} {'BOTH EMPTY':>10} {'DICE, DRAWN':>11}"]
    for label, found in summary.dice.items():
        lines.append(
            f"{label:<16} {found.images:>6} {found.mean:>9.3f} {found.both_empty:>10} "
            f"{_figure(found.mean_drawn):>11}"
        )
    if summary.masks_unread:
        why = "masks gone" if masks_known else "no answers folder given"
        lines.append(f"({summary.masks_unread} image(s) without Dice: {why})")
    return lines


def box_line(boxes: BoxCounts) -> str:
    return (
        f"boxes (FROC rule, live as reference): live {boxes.live}, shadow {boxes.shadow}, "
        f"matched {boxes.matched}, only live {boxes.only_live}, only shadow {boxes.only_shadow}"
    )


# -- the command ----------------------------------------------------------------------------

_DURATION: TypeAdapter[float] = TypeAdapter(Duration)


def window(text: str) -> dt.timedelta:
    """`--since`: a duration back from now (7d, 12h, 30m, 45s, 2w)."""
    try:
        return dt.timedelta(seconds=_DURATION.validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"expected a duration with its unit (7d, 12h, 30m), got {text!r}"
        ) from None


def add_compare_command(actions: Any) -> None:
    compare = actions.add_parser(
        "compare", help="agreement of each shadow version with the live one, over a window"
    )
    compare.add_argument("name", metavar="NAME")
    compare.add_argument(
        "--since", type=window, default=dt.timedelta(days=7), help="how far back (default 7d)"
    )


def compare_command(settings: Settings, args: argparse.Namespace) -> int:
    database = Database(settings.database_url)
    print(comparison_text(database, args.name, args.since, answers=settings.storage.answers))
    return 0


# -- metrics --------------------------------------------------------------------------------

_cache: dict[tuple[str, str], tuple[float, Comparisons]] = {}
_cache_lock = threading.Lock()


def cached_comparisons(database: Database, engine: str, answers: Path) -> Comparisons:
    """The metrics window's comparisons, recomputed at most every METRICS_CACHE_S."""
    key = (database.url.render_as_string(hide_password=True), engine)
    with _cache_lock:
        held = _cache.get(key)
        if held is not None and time.monotonic() - held[0] < METRICS_CACHE_S:
            return held[1]
        found = comparisons(
            database, engine, utcnow() - METRICS_WINDOW, answers=answers, limit=METRICS_MAX_PAIRS
        )
        _cache[key] = (time.monotonic(), found)
        return found


# name: (what it is, its label beside engine, live and shadow)
_FAMILIES = {
    "cadnode_engine_compared_images": (
        "Images answered by both the live and a shadow version",
        None,
    ),
    "cadnode_engine_agreement": (
        "Share of images where live and shadow decide alike at an operating point",
        "operating_point",
    ),
    "cadnode_engine_kappa": (
        "Cohen's kappa of live and shadow decisions at an operating point",
        "operating_point",
    ),
    "cadnode_engine_probability_difference": (
        "Probability, shadow minus live: mean, mean_absolute, max_absolute",
        "statistic",
    ),
    "cadnode_engine_dice": ("Mean Dice of shadow and live masks (both empty: 1)", "label"),
    "cadnode_engine_boxes": (
        "Detector boxes by the FROC rule: matched, only_live, only_shadow",
        "match",
    ),
}


def agreement_metrics(
    database: Database, engines: Iterable[str], answers: Path
) -> Iterator[Metric]:
    """Each engine's shadow versions against the live one over METRICS_WINDOW (cached)."""
    window = f"over the last {duration_text(METRICS_WINDOW)} (at most {METRICS_MAX_PAIRS} images)"
    families = {
        name: GaugeMetricFamily(
            name, f"{text}, {window}", labels=["engine", "live", "shadow", *filter(None, [extra])]
        )
        for name, (text, extra) in _FAMILIES.items()
    }
    for engine in sorted(set(engines)):
        for one in cached_comparisons(database, engine, answers).pairs:
            versions = [engine, one.live_version, one.shadow_version]
            for name, extra, value in _series(one.summary):
                families[name].add_metric([*versions, *extra], value)
    yield from families.values()


def _series(summary: Summary) -> Iterator[tuple[str, list[str], float]]:
    """(family, its own label's value, value) for every figure a summary has."""
    yield "cadnode_engine_compared_images", [], summary.images
    for point, table in summary.all_points.items():
        if table.agreement is not None:
            yield "cadnode_engine_agreement", [point], table.agreement
        if table.kappa is not None:
            yield "cadnode_engine_kappa", [point], table.kappa
    if (difference := summary.probability) is not None:
        for statistic in ("mean", "mean_absolute", "max_absolute"):
            value = getattr(difference, statistic)
            yield "cadnode_engine_probability_difference", [statistic], value
    for label, found in summary.dice.items():
        yield "cadnode_engine_dice", [label], found.mean
    if (boxes := summary.boxes) is not None:
        for match in ("matched", "only_live", "only_shadow"):
            yield "cadnode_engine_boxes", [match], getattr(boxes, match)
