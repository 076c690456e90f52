"""What goes into a report: the engines' answers, where the report goes, and the TID 1500
measurement groups built from them, with the checks that refuse an answer a group cannot
say truthfully."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from cadnode.encode.provenance import Algorithm, CodedLabel, concept
from cadnode.encode.seg import segment_frames
from cadnode.encode.sr.codes import (
    ABSENT,
    AREA,
    FINDING,
    MAXIMUM,
    NO_UNITS,
    NORMAL,
    NORMALITY,
    NORMALITY_UNDETERMINED,
    PERCENT,
    PERCENT_OF_HEMITHORAX,
    PRESENT,
    PROBABILITY,
    SQUARE_MM,
)
from cadnode.infer.answers import (
    REPORT,
    Box,
    DetectAnswer,
    DetectFinding,
    Healthy,
    LabelFinding,
    PointReached,
    SegmentFinding,
)
from cadnode.infer.bundle import Label

SR_SERIES_NUMBER = 900


@dataclass(frozen=True)
class Classification:
    """One source image's classifier answer."""

    source: pydicom.Dataset  # the source image header (pixel data may be absent)
    label: CodedLabel  # what the probability is of
    probability: float  # 0..1
    operating_point: str  # e.g. "rule_out"
    threshold: float
    ruled_out: bool  # probability < threshold: "no abnormality detected"
    # A multi-label engine's findings (each reported one gets its own group) and its
    # healthy label (a group when seed 002's rule reports it).
    findings: Sequence[LabelFinding] = ()
    healthy: Healthy | None = None

    @property
    def normality(self) -> Code:
        """The rule-out decision as CID 222 says it: Normal, or (not ruled out) Normality
        Undetermined."""
        return NORMAL if self.ruled_out else NORMALITY_UNDETERMINED


@dataclass(frozen=True)
class Segmented:
    """One source image's segmenter answer, and the SEG made of its masks."""

    source: pydicom.Dataset
    findings: Sequence[SegmentFinding]
    segmentation: pydicom.Dataset  # the SEG (`cadnode.encode.seg.segmentation`)


@dataclass(frozen=True)
class Detection:
    """One source volume's detector answer."""

    source: pydicom.Dataset
    answer: DetectAnswer


@dataclass(frozen=True)
class ReportIdentity:
    """Where a report goes: its UIDs, numbers and time.

    `content_datetime` is written as Content Date/Time, Instance Creation Date/Time and
    highdicom's Contribution DateTime; left out, they are the current time.
    """

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int = SR_SERIES_NUMBER
    instance_number: int = 1
    content_datetime: dt.datetime | None = None

    def tracking(self, *parts: str, identifier: str) -> hd.sr.TrackingIdentifier:
        uid = generate_uid(entropy_srcs=["cadnode-tracking", self.sop_instance_uid, *parts])
        return hd.sr.TrackingIdentifier(uid=uid, identifier=identifier)


class _GroupParts(TypedDict):
    """What a segment's planar and volumetric ROI groups share."""

    tracking_identifier: hd.sr.TrackingIdentifier
    finding_type: hd.sr.CodedConcept
    algorithm_id: hd.sr.AlgorithmIdentification
    qualitative_evaluations: list[hd.sr.QualitativeEvaluation]
    measurements: list[hd.sr.Measurement]


MeasurementGroup = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


# --- classifier ---------------------------------------------------------------------------


def classification_group(
    item: Classification, algorithm: Algorithm, identity: ReportIdentity, *, index: int
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Finding = the label; the label's probability; the rule-out decision as its own
    evaluation (Normality), with the operating point and threshold it was taken at."""
    source_uid, label = str(item.source.SOPInstanceUID), item.label.concept()
    decision = {"operating_point": item.operating_point, "threshold": repr(float(item.threshold))}
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=identity.tracking(
            source_uid, identifier=f"{algorithm.name} image {index}"
        ),
        finding_type=label,
        algorithm_id=algorithm.for_sr(),
        measurements=[_probability_of(label, item.probability)],
        qualitative_evaluations=[_decided(NORMALITY, item.normality, algorithm, decision)],
        source_images=[_source_for_group(item.source)],
    )


def finding_groups(
    item: Classification, algorithm: Algorithm, identity: ReportIdentity, *, index: int
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """A multi-label engine's reported findings, one group each: finding = the label's code,
    its probability, the decision "<label>" = Present at its `report` operating point; then
    the healthy label where seed 002's rule reports it, at the rule's beta."""
    said = [
        (finding.label, finding.probability, _operating_point(finding.operating_points, REPORT))
        for finding in item.findings
        if finding.reported
    ]
    healthy = item.healthy
    if healthy is not None and healthy.reported:
        point = {"operating_point": "prefilter_beta", "threshold": repr(healthy.beta)}
        said.append((healthy.label, healthy.probability, point))
    return [
        _label_group(item, label, probability, point, algorithm, identity, index=index)
        for label, probability, point in said
    ]


def _label_group(
    item: Classification,
    label: Label,
    probability: float,
    point: dict[str, str],
    algorithm: Algorithm,
    identity: ReportIdentity,
    *,
    index: int,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    source_uid, name, coded = str(item.source.SOPInstanceUID), label.name, concept(label.code)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=identity.tracking(
            source_uid, name, identifier=f"{algorithm.name} image {index} {name}"
        ),
        finding_type=coded,
        algorithm_id=algorithm.for_sr(),
        measurements=[_probability_of(coded, probability)],
        qualitative_evaluations=[_decided(coded, PRESENT, algorithm, point)],
        source_images=[_source_for_group(item.source)],
    )


def check_classification(item: Classification) -> None:
    p, t = float(item.probability), float(item.threshold)
    check_probability(p)
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ValueError(f"threshold {item.threshold!r} is not within 0..1")
    if item.ruled_out != (p < t):
        raise ValueError(
            f"ruled_out={item.ruled_out} contradicts probability {p!r} "
            f"and threshold {t!r} (ruled out means probability < threshold)"
        )
    if not item.operating_point:
        raise ValueError("operating point name is empty")


# --- segmenter ----------------------------------------------------------------------------


def segment_group(
    item: Segmented,
    finding: SegmentFinding,
    algorithm: Algorithm,
    identity: ReportIdentity,
    *,
    image: int,
) -> MeasurementGroup:
    seg, source = item.segmentation, item.source
    number = finding.segment_number
    label = concept(finding.label.code)
    present = finding.operating_points.get("present")
    reached = present.reached if present is not None else finding.probability > 0
    frames = segment_frames(seg, number)
    source_image = hd.sr.SourceImageForSegmentation(
        str(source.SOPClassUID), str(source.SOPInstanceUID)
    )
    common = _GroupParts(
        tracking_identifier=identity.tracking(
            str(source.SOPInstanceUID),
            str(number),
            identifier=f"{algorithm.name} image {image} {finding.label.name}",
        ),
        finding_type=label,
        algorithm_id=algorithm.for_sr(),
        qualitative_evaluations=[
            _decided(
                label,
                PRESENT if reached else ABSENT,
                algorithm,
                _operating_point(finding.operating_points, "present"),
            )
        ],
        measurements=_segment_measurements(finding, label),
    )
    if _frame_count(source) == 1:
        reference = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            frame_number=frames,
            segment_number=number,
            source_image=source_image,
        )
        # The image reference macro allows Referenced Segment Number only where no frame
        # is referenced (dciodvfy: "shall not be present"); the SEG frame names its segment.
        del reference[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=reference, **common
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=number,
            # The segment number names all its frames; with frame numbers too the image
            # reference macro would forbid the segment number (see above).
            source_images=[source_image],
        ),
        **common,
    )


def _segment_measurements(
    finding: SegmentFinding, label: hd.sr.CodedConcept
) -> list[hd.sr.Measurement]:
    """The segment's probability (the highest of its pixels), area and, for a
    pneumothorax, percent of the hemithorax: all of the group's segment (TID 1410), each
    saying which finding it is of."""
    values = finding.measurements
    measured = [_probability_of(label, finding.probability, derivation=MAXIMUM)]
    if "area_mm2" in values:
        measured.append(_measurement(AREA, values["area_mm2"], SQUARE_MM, of=label))
    if "percent_of_hemithorax" in values:
        share = values["percent_of_hemithorax"]
        measured.append(_measurement(PERCENT_OF_HEMITHORAX, share, PERCENT, of=label))
    return measured


def check_segmentation(item: Segmented) -> None:
    seg, source = item.segmentation, item.source
    derived_from = {
        str(reference.ReferencedSOPInstanceUID)
        for series in seg.get("ReferencedSeriesSequence", [])
        for reference in series.ReferencedInstanceSequence
    }
    if str(source.SOPInstanceUID) not in derived_from:
        raise ValueError(f"SEG {seg.SOPInstanceUID} does not reference its source image")
    numbers = {int(segment.SegmentNumber) for segment in seg.SegmentSequence}
    for finding in item.findings:
        if finding.segment_number not in numbers:
            raise ValueError(f"SEG {seg.SOPInstanceUID} has no segment {finding.segment_number}")


# --- detector -----------------------------------------------------------------------------


def region_group(
    source: pydicom.Dataset,
    finding: DetectFinding,
    algorithm: Algorithm,
    identity: ReportIdentity,
    *,
    volume: int,
    index: int,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    box, label = finding.box, concept(finding.label.code)
    uid, sop_class = str(source.SOPInstanceUID), str(source.SOPClassUID)
    # SCOORD puts 0,0 at the top-left corner of the top-left pixel, so a box covering
    # columns x .. x + width - 1 runs from x to x + width.
    left, top, right, bottom = box.x, box.y, box.x + box.width, box.y + box.height
    corners = np.array(
        [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]], dtype=float
    )
    probability = _probability_of(
        label,
        finding.probability,
        referenced_images=[hd.sr.SourceImageForMeasurement(sop_class, uid, box_frames(box))],
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=identity.tracking(
            uid, str(index), identifier=f"{algorithm.name} volume {volume} finding {index}"
        ),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=corners,
            source_image=hd.sr.SourceImageForRegion(sop_class, uid, [box.frame]),
        ),
        finding_type=label,
        algorithm_id=algorithm.for_sr(),
        qualitative_evaluations=[
            _decided(label, PRESENT, algorithm, _operating_point(finding.operating_points))
        ],
        measurements=[probability],
    )


def box_frames(box: Box) -> list[int]:
    """The frames a finding spans (its slice span), 1-based."""
    return list(range(box.first_frame, box.first_frame + box.depth))


def absent_group(
    item: Detection, algorithm: Algorithm, identity: ReportIdentity, *, volume: int
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A volume without a finding: one group on the volume saying its label is "Absent".

    No probability: the answer's is its best reported finding's, 0 when none was reported,
    which is not the probability that the volume holds no mass (candidates below the
    operating point scored more)."""
    label = concept(item.answer.label.code)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=identity.tracking(
            str(item.source.SOPInstanceUID), identifier=f"{algorithm.name} volume {volume}"
        ),
        finding_type=label,
        algorithm_id=algorithm.for_sr(),
        qualitative_evaluations=[
            _decided(label, ABSENT, algorithm, _operating_point(item.answer.operating_points))
        ],
        source_images=[_source_for_group(item.source)],
    )


def check_box(source: pydicom.Dataset, finding: DetectFinding) -> None:
    box, frames = finding.box, _frame_count(source)
    rows, columns = int(source.Rows), int(source.Columns)
    check_probability(finding.probability)
    if not (box.width > 0 and box.height > 0):
        raise ValueError(f"box {box} is empty")
    if box.x < 0 or box.y < 0 or box.x + box.width > columns or box.y + box.height > rows:
        raise ValueError(f"box {box} lies outside the {rows}x{columns} image")
    last = box.first_frame + box.depth - 1
    if not (box.first_frame <= box.frame <= last <= frames):
        raise ValueError(
            f"frame {box.frame} and span {box.first_frame}..{last} do not fit 1..{frames}"
        )


# --- shared -------------------------------------------------------------------------------


def _decided(
    name: hd.sr.CodedConcept | Code,
    value: Code,
    algorithm: Algorithm,
    point: dict[str, str],
) -> hd.sr.QualitativeEvaluation:
    """A decision (a qualitative evaluation) carrying the TID 4019 it was taken with: the
    operating point and its threshold sit on the decision they made, not on the group,
    whose probability does not depend on them."""
    evaluation = hd.sr.QualitativeEvaluation(name=name, value=value)
    evaluation[0].ContentSequence = hd.sr.ContentSequence(algorithm.for_sr(**point))
    return evaluation


def _operating_point(points: dict[str, PointReached], name: str = "report") -> dict[str, str]:
    """An operating point as TID 4019 parameters, when the answer has it."""
    point = points.get(name)
    return {} if point is None else {"operating_point": name, "threshold": repr(point.threshold)}


def _probability_of(
    label: hd.sr.CodedConcept,
    value: float,
    *,
    derivation: Code | None = None,
    referenced_images: Sequence[hd.sr.SourceImageForMeasurement] | None = None,
) -> hd.sr.Measurement:
    """The label's probability, saying so (see `_measurement`)."""
    check_probability(value)
    return _measurement(
        PROBABILITY,
        value,
        NO_UNITS,
        of=label,
        derivation=derivation,
        referenced_images=referenced_images,
    )


def _measurement(
    name: hd.sr.CodedConcept | Code,
    value: float,
    unit: Code,
    *,
    of: hd.sr.CodedConcept,
    derivation: Code | None = None,
    referenced_images: Sequence[hd.sr.SourceImageForMeasurement] | None = None,
) -> hd.sr.Measurement:
    """A measurement that says what it is of: the concept modifier Finding = `of` (TID 300
    allows post-coordinating a measurement's name), read "Probability ... Finding:
    Pneumothorax". The group's TID 4019 names its algorithm. OHIF also needs it: it reads
    the children of every NUM of a group without a SCOORD and throws on a NUM without."""
    if not math.isfinite(value):
        raise ValueError(f"{name.meaning} {value!r} is not a finite number")
    measurement = hd.sr.Measurement(
        name=name,
        value=float(value),
        unit=unit,
        derivation=derivation,
        referenced_images=referenced_images,
    )
    finding = hd.sr.CodeContentItem(
        name=FINDING, value=of, relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD
    )
    item = measurement[0]
    # TID 300 row 2 (the name's modifiers) comes before its method and derivation.
    item.ContentSequence = hd.sr.ContentSequence([finding, *item.get("ContentSequence", [])])
    return measurement


def _source_for_group(source: pydicom.Dataset) -> hd.sr.SourceImageForMeasurementGroup:
    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
    )


def check_probability(value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"probability {value!r} is not within 0..1")


def _frame_count(source: pydicom.Dataset) -> int:
    return int(getattr(source, "NumberOfFrames", 1) or 1)
