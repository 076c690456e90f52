"""What an engine answered, as infer writes it (`Result.answer`) and encode and prioritize read it.

One answer per source image (a radiograph, or a whole multi-frame DBT volume), shaped by
the engine's task kind. Each answer is self-contained: later stages need nothing from the
engine bundle to encode or rank it. Later stages ask the answer, never its `task` string:
`statements()` is what it says (the answer's own verdict and each finding: label,
probability, operating points reached, measurements), which conditions test
(cadnode.infer.conditions: pipeline steps' and priority rules' `when:`); `positive` whether
it reached any operating point; `ruled_out` the rule-out decision (a classifier with a
`rule_out` operating point; None for any other answer).

Coordinates are the source image's own: `x` is the column and `y` the row of a box's
top-left corner, in pixels of the stored image (not the model input); frame numbers are
1-based, as DICOM's Referenced Frame Number. Masks are too big for the database: infer
writes them to a file (`save_masks`) under the answers folder (`StorageSettings.answers`)
and the answer names it relative to that folder.
"""

from __future__ import annotations

import io
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from cadnode.core.files import write_durably
from cadnode.infer.bundle import REPORT_POINT, Label

# The classifier operating point below which a study is "no abnormality detected" (DESIGN §4).
RULE_OUT = "rule_out"
# A finding's operating point that decides whether it is reported (a detector's, or a
# multi-label classifier's per finding: bundle.REPORT_POINT).
REPORT = REPORT_POINT


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PointReached(_Answer):
    """An operating point of the manifest, and whether this answer reached it."""

    threshold: float
    reached: bool
    description: str = ""


@dataclass(frozen=True)
class Statement:
    """One thing an answer says, as a condition tests it: a classifier's verdict, a
    detector's best score, or one finding (a segment, a detected lesion)."""

    label: Label
    probability: float
    operating_points: Mapping[str, PointReached]
    measurements: Mapping[str, float]

    @property
    def reached(self) -> bool:
        """Whether it reached any of its operating points."""
        return any(point.reached for point in self.operating_points.values())


class _Said(_Answer):
    """What every answer kind tells the stages after infer."""

    @abstractmethod  # pydantic's model metaclass is an ABCMeta: each kind must say it
    def statements(self) -> list[Statement]:
        """What this answer says, one statement per verdict or finding."""

    @property
    def positive(self) -> bool:
        """Reached an operating point: not ruled out (a classifier's `rule_out` reached, or
        another of its points), a segment present, a finding reported."""
        return any(statement.reached for statement in self.statements())


class LabelFinding(_Answer):
    """One finding of a multi-label classifier: its probability and its own operating
    points, each reached at or above its threshold unless seed 002's rule suppressed every
    finding (`Healthy.suppressed`). Reported when its `report` point is reached."""

    label: Label
    probability: float
    operating_points: dict[str, PointReached]

    @property
    def reported(self) -> bool:
        point = self.operating_points.get(REPORT)
        return point is not None and point.reached


class Healthy(_Answer):
    """A multi-label classifier's P(healthy) label (e.g. "No Finding") and seed 002's rule
    on it: above `alpha` only it is reported (`suppressed`: no finding is), above `beta` it
    is reported beside the findings."""

    label: Label
    probability: float
    alpha: float | None = None  # None: the manifest has no prefilter, nothing is decided
    beta: float | None = None

    @property
    def reported(self) -> bool:
        return self.beta is not None and self.probability > self.beta

    @property
    def suppressed(self) -> bool:
        return self.alpha is not None and self.probability > self.alpha


class ClassifyAnswer(_Said):
    task: Literal["classify"] = "classify"
    label: Label  # the label the probability is about (e.g. abnormal)
    probability: float
    operating_points: dict[str, PointReached]
    ruled_out: bool | None = None  # set when the manifest has a `rule_out` operating point
    # A multi-label engine's (bundle.Findings): every finding, reported or not, and its
    # healthy label. Empty and None for a single-label classifier.
    findings: list[LabelFinding] = Field(default_factory=list)
    healthy: Healthy | None = None

    @property
    def rule_out_point(self) -> PointReached | None:
        """The `rule_out` operating point, when the engine is a rule-out filter."""
        return self.operating_points.get(RULE_OUT)

    @property
    def reported(self) -> list[LabelFinding]:
        """The findings a multi-label engine reports (through seed 002's rule)."""
        return [finding for finding in self.findings if finding.reported]

    def statements(self) -> list[Statement]:
        """The verdict on the first label, then each finding of a multi-label engine."""
        own = Statement(self.label, self.probability, self.operating_points, {})
        return [own] + [
            Statement(f.label, f.probability, f.operating_points, {}) for f in self.findings
        ]


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


class SegmentAnswer(_Said):
    task: Literal["segment"] = "segment"
    mask_file: str  # relative to the answers folder; see save_masks
    frames: int = Field(ge=1)
    rows: int = Field(ge=1)
    columns: int = Field(ge=1)
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column) spacing
    findings: list[SegmentFinding]

    @property
    def ruled_out(self) -> None:
        """Only a classifier rules a study out."""
        return None

    def statements(self) -> list[Statement]:
        """One per segment: the answer itself has no label or probability of its own."""
        return [
            Statement(f.label, f.probability, f.operating_points, f.measurements)
            for f in self.findings
        ]


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


class DetectAnswer(_Said):
    task: Literal["detect"] = "detect"
    frames: int = Field(ge=1)
    rows: int = Field(ge=1)
    columns: int = Field(ge=1)
    pixel_spacing_mm: tuple[float, float] | None = None
    label: Label
    probability: float  # the best finding's score, 0 when there is none
    operating_points: dict[str, PointReached]  # {"report": reached when any finding is}
    findings: list[DetectFinding]  # the findings at or above the `report` operating point

    @property
    def ruled_out(self) -> None:
        """Only a classifier rules a study out."""
        return None

    def statements(self) -> list[Statement]:
        """The volume's best score, then each finding."""
        own = Statement(self.label, self.probability, self.operating_points, {})
        return [own] + [
            Statement(f.label, f.probability, f.operating_points, f.measurements)
            for f in self.findings
        ]

    def best_frame(self) -> int:
        """The frame where the best finding scores highest; the middle frame without one."""
        if not self.findings:
            return (self.frames + 1) // 2
        return max(self.findings, key=lambda finding: finding.probability).box.frame

    def findings_on(self, frame: int) -> list[DetectFinding]:
        """The findings whose boxes span `frame`."""
        return [
            f for f in self.findings if f.box.first_frame <= frame < f.box.first_frame + f.box.depth
        ]


Answer = Annotated[ClassifyAnswer | SegmentAnswer | DetectAnswer, Field(discriminator="task")]
_ANSWER: TypeAdapter[Answer] = TypeAdapter(Answer)


def parse_answer(stored: Mapping[str, Any]) -> Answer:
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
        present = [s for s in answer.statements() if s.reached]
        return ", ".join(_segment_text(s) for s in present) or "nothing segmented"
    if isinstance(answer, DetectAnswer):
        name, count = answer.label.name, len(answer.findings)
        return f"{count} {name} finding(s)" if count else f"no {name} reported"
    if answer.ruled_out:
        return "no abnormality detected (ruled out)"
    if answer.healthy is not None or answer.findings:
        return _findings_text(answer)
    name = answer.label.name
    return name if answer.positive else f"not {name}"


def _findings_text(answer: ClassifyAnswer) -> str:
    """A multi-label answer: its reported findings, and the healthy label where reported."""
    said = [finding.label.name for finding in answer.reported]
    if answer.healthy is not None and answer.healthy.reported:
        said.append(answer.healthy.label.name)
    return ", ".join(said) or "no finding reported"


def _segment_text(finding: Statement) -> str:
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
