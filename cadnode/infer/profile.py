"""Each input's profile: the acquisition attributes drift watches (cadnode.watch.drift), read
from an image's header, and the categories they are compared in.

Infer records an InputProfile row per engine answer (`record_profiles`) in the commit that
moves the job to `inferred`; training writes the same categories of its own films into the
bundle's manifest (`population_of`, `Manifest.population`), so the node compares what it
sees with what the engine learned from. Every attribute is compared as a category: numbers
are binned (pixel spacing to 0.01 mm, kVp to 5 kV, the image size as rows x columns), and
an absent attribute is the category "none".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlmodel import Session, col, select

from cadnode.core.db import InputProfile, Instance, Job, Result
from cadnode.infer.answers import parse_answer
from cadnode.infer.bundle import Population

log = structlog.get_logger("cadnode.infer")

ATTRIBUTES = (
    "manufacturer",
    "model",
    "pixel_spacing",
    "kvp",
    "body_part",
    "photometric",
    "image_size",
)
NONE = "none"  # the category of an attribute the image does not have
PROBABILITY_BINS = 10
QUANTILES = np.linspace(0, 1, 21)  # Population.probability_quantiles: every 5th percentile


@dataclass(frozen=True)
class InputFacts:
    """An image's acquisition attributes, as its header gives them ("" or None: absent)."""

    manufacturer: str = ""
    model: str = ""
    pixel_spacing: float | None = None  # mm between rows
    kvp: float | None = None
    body_part: str = ""
    photometric: str = ""
    rows: int | None = None
    columns: int | None = None

    def categories(self) -> dict[str, str]:
        """Each of ATTRIBUTES as the category drift compares."""
        size = f"{self.rows}x{self.columns}" if self.rows and self.columns else NONE
        return {
            "manufacturer": self.manufacturer or NONE,
            "model": self.model or NONE,
            "pixel_spacing": NONE if self.pixel_spacing is None else f"{self.pixel_spacing:.2f}",
            "kvp": NONE if self.kvp is None else f"{5 * round(self.kvp / 5):g}",
            "body_part": self.body_part or NONE,
            "photometric": self.photometric or NONE,
            "image_size": size,
        }


def facts_of(ds: Dataset) -> InputFacts:
    """The attributes of a radiograph's or an enhanced multi-frame image's header (pixel
    spacing from the shared functional groups where the top level has none)."""
    return InputFacts(
        manufacturer=_text(ds.get("Manufacturer")),
        model=_text(ds.get("ManufacturerModelName")),
        pixel_spacing=_spacing(ds),
        kvp=_number(ds.get("KVP")),
        body_part=_text(ds.get("BodyPartExamined")).upper(),
        photometric=_text(ds.get("PhotometricInterpretation")),
        rows=_whole(ds.get("Rows")),
        columns=_whole(ds.get("Columns")),
    )


def read_facts(path: Path) -> InputFacts | None:
    """A file's attributes from its header alone; None when it does not read."""
    try:
        return facts_of(dcmread(path, stop_before_pixels=True))
    except (OSError, InvalidDicomError, ValueError, AttributeError):
        return None


def probability_bin(probability: float) -> str:
    """The histogram bin of a probability, named by its lower edge: "0.0" ... "0.9"."""
    index = min(max(int(probability * PROBABILITY_BINS), 0), PROBABILITY_BINS - 1)
    return f"{index / PROBABILITY_BINS:.1f}"


def record_profiles(session: Session, job: Job, results: Sequence[Result], spool: Path) -> None:
    """Add an InputProfile for each of the job's answers (the caller commits): each image's
    header is read once, however many engines answered it. An image that no longer reads
    is profiled without its attributes rather than holding up the job."""
    uids = {result.sop_instance_uid for result in results}
    instances = session.exec(select(Instance).where(col(Instance.sop_instance_uid).in_(uids)))
    found = {
        instance.sop_instance_uid: (instance.calling_ae, read_facts(spool / instance.path))
        for instance in instances
    }
    assert job.id is not None
    for result in results:
        sender, facts = found.get(result.sop_instance_uid, ("", None))
        if facts is None:
            log.warning("profile.unreadable", job=job.id, engine=result.engine)
        answer = parse_answer(result.answer)
        session.add(
            InputProfile(
                job_id=job.id,
                sender=sender,
                engine=result.engine,
                engine_version=result.engine_version,
                shadow=result.shadow,
                **asdict(facts or InputFacts()),  # its fields are the columns
                probability=max((s.probability for s in answer.statements()), default=None),
                positive=answer.positive,
            )
        )


def population_of(
    facts: Iterable[InputFacts], probabilities: Sequence[float], threshold: float
) -> Population:
    """A bundle's training population: the categories of its training images' `facts`, and
    its held-out `probabilities` (positive at or over `threshold`, its lowest operating
    point). Attributes no image has are left out (unknown, not compared)."""
    counts: dict[str, Counter[str]] = {name: Counter() for name in ATTRIBUTES}
    images = 0
    for fact in facts:
        images += 1
        for name, category in fact.categories().items():
            counts[name][category] += 1
    scores = np.asarray(probabilities, dtype=float)
    if images == 0 or scores.size == 0:
        raise ValueError("a population needs training images and held-out probabilities")
    bins = Counter(probability_bin(p) for p in scores)
    return Population(
        images=images,
        metadata={
            name: {category: round(n / images, 6) for category, n in sorted(seen.items())}
            for name, seen in counts.items()
            if set(seen) != {NONE}
        },
        answers=int(scores.size),
        probability_histogram=[
            round(bins[f"{i / PROBABILITY_BINS:.1f}"] / scores.size, 6)
            for i in range(PROBABILITY_BINS)
        ],
        probability_quantiles=[round(float(q), 6) for q in np.quantile(scores, QUANTILES)],
        positive_rate=round(float(np.mean(scores >= threshold)), 6),
    )


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()[:64]


def _number(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _whole(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _spacing(ds: Dataset) -> float | None:
    for holder in (ds, *_shared_measures(ds)):
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            value = holder.get(keyword)
            if value:
                return _number(value[0])
    return None


def _shared_measures(ds: Dataset) -> list[Dataset]:
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    return [m for group in shared for m in (group.get("PixelMeasuresSequence") or [])]
