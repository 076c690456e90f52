"""What an engine answered, as infer writes it (`Result.answer`) and encode and prioritize read it.

One answer per source image (a radiograph, or a whole multi-frame DBT volume), shaped by
the engine's task kind. Each answer is self-contained: later stages need nothing from the
engine bundle to encode or rank it. The priority policy reads `label`, `probability`,
`operating_points`, `ruled_out`, `measurements` and `findings` from any of them
(cadnode.prioritize.policy).

Coordinates are the source image's own: `x` is the column and `y` the row of a box's
top-left corner, in pixels of the stored image (not the model input); frame numbers are
1-based, as DICOM's Referenced Frame Number. Masks are too big for the database: infer
writes them to a file (`save_masks`) under the answers folder (`StorageSettings.answers`)
and the answer names it relative to that folder.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from cadnode.core.files import write_durably
from cadnode.infer.bundle import Label


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PointReached(_Answer):
    """An operating point of the manifest, and whether this answer reached it."""

    threshold: float
    reached: bool
    description: str = ""


class ClassifyAnswer(_Answer):
    task: Literal["classify"] = "classify"
    label: Label  # the label the probability is about (e.g. abnormal)
    probability: float
    operating_points: dict[str, PointReached]
    ruled_out: bool | None = None  # set when the manifest has a `rule_out` operating point


class SegmentFinding(_Answer):
    """One label's mask: a segment of the SEG, numbered in the manifest's label order."""

    label: Label
    segment_number: int = Field(ge=1)
    probability: float  # the highest pixel probability inside the mask (0 when empty)
    # {"present": threshold = the label's pixel threshold, reached = the mask is not empty}
    operating_points: dict[str, PointReached]
    # area_px always; area_mm2 when the image has a pixel spacing; percent_of_hemithorax
    # for pneumothorax (its area over itself plus the lung field on the same side).
    measurements: dict[str, float] = Field(default_factory=dict)


class SegmentAnswer(_Answer):
    task: Literal["segment"] = "segment"
    mask_file: str  # relative to the answers folder; see save_masks
    frames: int = Field(ge=1)
    rows: int = Field(ge=1)
    columns: int = Field(ge=1)
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column) spacing
    findings: list[SegmentFinding]


class Box(_Answer):
    x: float  # column of the top-left corner, source pixels
    y: float  # row of the top-left corner, source pixels
    width: float
    height: float
    frame: int = Field(ge=1)  # the frame where the finding scores highest
    first_frame: int = Field(ge=1)  # the finding spans first_frame .. first_frame + depth - 1
    depth: int = Field(ge=1)


class DetectFinding(_Answer):
    label: Label
    probability: float  # the fused box's score
    operating_points: dict[str, PointReached]  # {"report": ...}: reported findings reach it
    box: Box
    measurements: dict[str, float] = Field(default_factory=dict)  # e.g. width_mm, height_mm


class DetectAnswer(_Answer):
    task: Literal["detect"] = "detect"
    frames: int = Field(ge=1)
    rows: int = Field(ge=1)
    columns: int = Field(ge=1)
    pixel_spacing_mm: tuple[float, float] | None = None
    label: Label
    probability: float  # the best finding's score, 0 when there is none
    operating_points: dict[str, PointReached]  # {"report": reached when any finding is}
    findings: list[DetectFinding]  # the findings at or above the `report` operating point


Answer = Annotated[ClassifyAnswer | SegmentAnswer | DetectAnswer, Field(discriminator="task")]
_ANSWER: TypeAdapter[Answer] = TypeAdapter(Answer)


def parse_answer(stored: dict[str, Any]) -> Answer:
    """A `Result.answer` read back; answers stored before `task` existed are classifications."""
    return _ANSWER.validate_python({"task": "classify", **stored})


def dump_answer(answer: Answer) -> dict[str, Any]:
    """The JSON form stored in `Result.answer`."""
    return answer.model_dump(mode="json")


def summary(answer: Answer) -> str:
    """What the engine said, in one line for a person (the CLI, the dashboard, a Secondary
    Capture's caption): "no abnormality detected (ruled out)", "abnormal", "pneumothorax
    (35% of hemithorax), right lung", "2 mass finding(s)". The probability is left to the
    caller to show or not."""
    if isinstance(answer, SegmentAnswer):
        present = [f for f in answer.findings if _reached(f.operating_points)]
        return ", ".join(_segment_text(f) for f in present) or "nothing segmented"
    if isinstance(answer, DetectAnswer):
        name, count = answer.label.name, len(answer.findings)
        return f"{count} {name} finding(s)" if count else f"no {name} reported"
    if answer.ruled_out:
        return "no abnormality detected (ruled out)"
    name = answer.label.name
    return name if _reached(answer.operating_points) else f"not {name}"


def _reached(points: dict[str, PointReached]) -> bool:
    return any(point.reached for point in points.values())


def _segment_text(finding: SegmentFinding) -> str:
    name = finding.label.name.replace("_", " ")
    share = finding.measurements.get("percent_of_hemithorax")
    return f"{name} ({share:.0f}% of hemithorax)" if share is not None else name


def save_masks(path: Path, masks: np.ndarray) -> None:
    """Boolean masks shaped (frames, labels, rows, columns), written durably (compressed)."""
    if masks.ndim != 4 or masks.dtype != np.bool_:
        raise ValueError(f"masks must be bool (frames, labels, rows, columns), got {masks.shape}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, masks=np.packbits(masks, axis=-1), shape=np.asarray(masks.shape))
    write_durably(path, [buffer.getvalue()])


def load_masks(path: Path) -> np.ndarray:
    """The boolean (frames, labels, rows, columns) array `save_masks` wrote."""
    with np.load(path) as stored:
        shape = tuple(int(n) for n in stored["shape"])
        unpacked = np.unpackbits(stored["masks"], axis=-1, count=shape[-1])
    return unpacked.reshape(shape).astype(bool)
