"""What a presentation state draws: each finding as outlines and a line of text, per frame.

A `Mark` is one finding on one source image: closed polylines in PIXEL units, a text saying
what it is and how probable, the frames it is on, and the `Layer` it belongs to (one per
label, coloured as the Secondary Capture colours it: `cadnode.encode.overlay`). The engine
answers become marks here (`classification_marks`, `segmentation_marks`, `detection_marks`),
and text is placed here (`text_box`), so sop.py only assembles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pydicom

from cadnode.encode.overlay import BOX_COLOUR, PALETTE
from cadnode.encode.pr.outline import outlines
from cadnode.infer.answers import (
    RULE_OUT,
    ClassifyAnswer,
    DetectAnswer,
    DetectFinding,
    SegmentAnswer,
    SegmentFinding,
    summary,
)
from cadnode.infer.bundle import Label

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)

# Text height as a share of the image's longer side: legible when the image is fit to a
# screen, small enough to leave the findings visible.
TEXT_HEIGHT = 1 / 32
# A character's width as a share of its height, for sizing a text's bounding box.
CHARACTER_ASPECT = 0.6


@dataclass(frozen=True)
class Layer:
    """A graphic layer: what a viewer lists and lets the reader hide, in one colour."""

    name: str  # e.g. "pneumothorax"; made a DICOM code string (and unique) in sop.py
    description: str
    colour: RGB


# Where an answer without a finding says so ("nothing segmented", "no mass reported").
VERDICT = Layer(name="verdict", description="what the engine found", colour=WHITE)


@dataclass(frozen=True, eq=False)  # eq: numpy arrays do not compare to a bool
class Mark:
    """One finding (or statement) drawn on a source image."""

    layer: Layer
    text: str  # e.g. "Pneumothorax 0.93, 12% of hemithorax"
    # 1-based frames of a multi-frame source; () for every frame (and for a single-frame image)
    frames: tuple[int, ...] = ()
    # closed polylines, (n, 2) float arrays of (column, row) in PIXEL units, first = last
    polylines: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class Annotated:
    """A source image (its header: no pixels needed) and what is drawn on it."""

    source: pydicom.Dataset
    marks: tuple[Mark, ...] = ()


# --- from the engines' answers ------------------------------------------------------------


def classification_marks(answer: ClassifyAnswer) -> tuple[Mark, ...]:
    """The verdict as text, e.g. "Abnormal 0.99 (not ruled out at rule_out 0.47)"."""
    text = f"{answer.label.code.meaning} {answer.probability:.2f}"
    point = answer.rule_out_point
    if point is not None:
        verdict = "ruled out" if answer.ruled_out else "not ruled out"
        text += f" ({verdict} at {RULE_OUT} {point.threshold:.2f})"
    return (Mark(_layer(answer.label, WHITE), text),)


def segmentation_marks(answer: SegmentAnswer, masks: np.ndarray) -> tuple[Mark, ...]:
    """Each present segment's outlines on each frame it has pixels on, with its text;
    "nothing segmented" when no segment is present. `masks` is bool (frames, labels, rows,
    columns), labels numbered as the answer's segments."""
    if masks.ndim != 4:
        raise ValueError(f"masks must be (frames, labels, rows, columns), got {masks.shape}")
    multi_frame = masks.shape[0] > 1
    marks = []
    for finding in answer.findings:
        if not _present(finding):
            continue
        layer = _layer(finding.label, PALETTE[(finding.segment_number - 1) % len(PALETTE)])
        for index, frame_masks in enumerate(masks):
            mask = frame_masks[finding.segment_number - 1]
            if mask.any():
                frames = (index + 1,) if multi_frame else ()
                polylines = tuple(outlines(mask))
                marks.append(Mark(layer, _segment_text(finding), frames, polylines))
    return tuple(marks) or (_nothing(answer),)


def detection_marks(answer: DetectAnswer) -> tuple[Mark, ...]:
    """Each finding's box as a closed rectangle on every frame it spans, with its text;
    "no <label> reported" without a finding."""
    marks = [_box_mark(finding, multi_frame=answer.frames > 1) for finding in answer.findings]
    return tuple(marks) or (_nothing(answer),)


def _present(finding: SegmentFinding) -> bool:
    return any(point.reached for point in finding.operating_points.values())


def _segment_text(finding: SegmentFinding) -> str:
    text = f"{finding.label.code.meaning} {finding.probability:.2f}"
    share = finding.measurements.get("percent_of_hemithorax")
    return text + (f", {share:.0f}% of hemithorax" if share is not None else "")


def _box_mark(finding: DetectFinding, *, multi_frame: bool) -> Mark:
    box = finding.box
    # PIXEL units put 0,0 at the top-left corner of the top-left pixel, so a box covering
    # columns x .. x + width - 1 runs from x to x + width (as the detector's SR draws it).
    left, top, right, bottom = box.x, box.y, box.x + box.width, box.y + box.height
    rectangle = np.array(
        [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]], dtype=float
    )
    frames = tuple(range(box.first_frame, box.first_frame + box.depth)) if multi_frame else ()
    text = f"{finding.label.code.meaning} {finding.probability:.2f}"
    return Mark(_layer(finding.label, BOX_COLOUR), text, frames, (rectangle,))


def _nothing(answer: SegmentAnswer | DetectAnswer) -> Mark:
    return Mark(VERDICT, summary(answer))


def _layer(label: Label, colour: RGB) -> Layer:
    return Layer(name=label.name, description=label.code.meaning, colour=colour)


# --- where text goes ----------------------------------------------------------------------


def text_height(rows: int, columns: int) -> float:
    return max(rows, columns) * TEXT_HEIGHT


def text_box(
    text: str, anchor: tuple[float, float], rows: int, columns: int, *, below: bool = False
) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in PIXEL units for a line of `text` sized to the image,
    starting at `anchor` (column, row), above it (or `below`, or where there is no room
    above), kept inside the image."""
    height = min(text_height(rows, columns), float(rows))
    width = min(float(columns), height * CHARACTER_ASPECT * max(len(text), 1))
    column, row = anchor
    left = min(max(column, 0.0), columns - width)
    top = row if below or row < height else row - height
    top = min(max(top, 0.0), rows - height)
    return (left, top, left + width, top + height)


def anchor_of(polylines: tuple[np.ndarray, ...]) -> tuple[float, float]:
    """Where a finding's text points: the top-most (then left-most) point of its first
    outline (`outlines` gives the largest first), a point on the outline itself."""
    first = polylines[0]
    top_left = np.lexsort((first[:, 0], first[:, 1]))[0]
    column, row = first[top_left]
    return float(column), float(row)


def code_string(name: str) -> str:
    """`name` as a DICOM code string of at most 16 characters (upper case, digits, space,
    underscore), e.g. "right_lung" -> "RIGHT_LUNG"."""
    return re.sub(r"[^A-Z0-9 _]", "_", name.upper())[:16].strip() or "FINDING"
