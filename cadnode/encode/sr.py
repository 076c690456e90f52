"""Engines' answers as DICOM TID 1500 Measurement Reports (Comprehensive 3D SR).

Pure builders: datasets and answers in, a `highdicom.sr.Comprehensive3DSR` out. They read no
files, touch no database and make no UIDs of their own beyond ones derived from their
inputs. Only the clock differs between two builds: highdicom stamps Content Date/Time,
Instance Creation Date/Time and its own Contributing Equipment entry with the current time;
pass `content_datetime` (e.g. when the engine answered) and all of them take that value,
so the same inputs give the same bytes and rebuilding a report after a crash reproduces
the object its UID names (`cadnode.encode.provenance.stamp`).

The layout follows IHE AI Results (AIR): one TID 1500 report per study and engine, whose
observer is the engine (a device), whose evidence lists every source image (and the SEGs it
references), and whose measurement groups say what the engine found:

- classifier (`classification_report`): one TID 1501 group per source image holding the
  TID 4108 tracking identifier, the source image (DCM 121112 "Source of Measurement"), the
  finding (DCM 121071) = the label, e.g. SCT 263654008 "Abnormal", or SCT 17621005
  "Normal" when the film was ruled out, and the label's probability as TID 300
  measurement DCM 122157 "Probability", UCUM "1".
- segmenter (`segmentation_report`): per source image and label one TID 1410 planar ROI
  group (TID 1411 volumetric for a multi-frame source) whose ROI is the label's SEG segment
  (Referenced Segmentation Frame / Referenced Segment): the finding is the label (e.g. SCT
  36118008 "Pneumothorax"), a qualitative evaluation says it is SCT "Present" or "Absent",
  and its measurements are its area (SCT 42798000 "Area", UCUM mm2, from the image's pixel
  spacing), for pneumothorax its percent of the hemithorax (UCUM %) and the highest pixel
  probability. Every measurement of a group is of the group's segment, so each references
  its segment. The lung fields get their areas too.
- DBT detector (`detection_report`): one TID 1410 group per finding whose ROI is a closed
  POLYLINE rectangle (SCOORD) on the frame where it scores highest (SR SCOORD has no
  rectangle type; TID 1410 takes a closed polyline), with its probability, whose source of
  measurement lists every frame the finding spans (its slice span). A volume without a
  finding gets a TID 1501 group on the volume saying the label is "Absent".

Where the operating point and threshold go: they are parameters of the decision, so they
are TID 4019 "Algorithm Parameters" (DCM 111002) of the algorithm identification on the
measurement group, the part of the report the decision (the finding) belongs to, written
`operating_point=<name>` and `threshold=<value>` next to `sha256=<model hash>`. TID 4019 is
the template the standard gives for how an algorithm was run, and a reader finds these
with `AlgorithmIdentification.parameters`. The probability measurement carries its own
TID 4019 with only the model hash, because the probability does not depend on the
threshold. A second NUM "Threshold" would need an ad-hoc concept (TID 300 has no row for
it) and "CAD Operating Point" (DCM 111071) means an index into an operating-point table
in the CAD SR templates, not a probability cut-off.

Percent of the hemithorax has no standard concept; it is coded in cadnode's private coding
scheme 99CADNODE, which the report declares in its Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

import cadnode
from cadnode.encode.provenance import (
    MANUFACTURER,
    Algorithm,
    CodedLabel,
    check_sources,
    concept,
    source_header,
    split,
    stamp,
)
from cadnode.encode.seg import segment_frames
from cadnode.infer.answers import DetectAnswer, DetectFinding, PointReached, SegmentFinding

__all__ = [
    "MANUFACTURER",
    "Algorithm",
    "Classification",
    "CodedLabel",
    "Detection",
    "Segmented",
    "classification_report",
    "detection_report",
    "segmentation_report",
]

SR_SERIES_NUMBER = 900

# DCM 122157 "Probability", dimensionless (UCUM "1", "no units").
PROBABILITY = codes.DCM.Probability
NO_UNITS = codes.UCUM.NoUnits
# Recorded instead of the label when the film is ruled out: no abnormality detected.
NORMAL = codes.SCT.Normal
PRESENT, ABSENT = codes.SCT.Present, codes.SCT.Absent
AREA, SQUARE_MM, PERCENT = codes.SCT.Area, codes.UCUM.SquareMillimeter, codes.UCUM.Percent
# Procedure reported (TID 1500 row 5, BCID 100, extensible). SNOMED CT 399208008 "Plain
# chest X-ray" (FSN "Plain X-ray of chest (procedure)") names a chest radiograph without a
# view count; it is not in pydicom's code dictionary, whose nearest entries are broader
# (SCT 413815006 "Chest imaging", SCT 168537006 "Plain radiography").
PLAIN_CHEST_XRAY = hd.sr.CodedConcept(
    value="399208008", scheme_designator="SCT", meaning="Plain chest X-ray"
)
# Tomosynthesis is a mammographic procedure: SCT 71651007 "Mammography".
MAMMOGRAPHY = codes.SCT.Mammography

PRIVATE_SCHEME = "99CADNODE"
PERCENT_OF_HEMITHORAX = hd.sr.CodedConcept(
    value="CN-PTX-HEMI", scheme_designator=PRIVATE_SCHEME, meaning="Percent of hemithorax"
)
_PRIVATE_SCHEMES = [
    CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="cadnode local codes",
        responsible_organization="cadnode",
    )
]


@dataclass(frozen=True)
class Classification:
    """One source image's classifier answer."""

    source: pydicom.Dataset  # the source image header (pixel data may be absent)
    label: CodedLabel  # what the probability is of
    probability: float  # 0..1
    operating_point: str  # e.g. "rule_out"
    threshold: float
    ruled_out: bool  # probability < threshold: "no abnormality detected"


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


_Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


# --- classifier ---------------------------------------------------------------------------


def classification_report(
    classifications: list[Classification],
    algorithm: Algorithm,
    identity: ReportIdentity,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report with one measurement group per classified source image.

    All sources must belong to one study (the SR joins that study).
    Raises ValueError on an empty list, mixed studies or patients, a repeated source,
    an out-of-range probability or threshold, or a `ruled_out` that contradicts them.
    """
    if not classifications:
        raise ValueError("a classification report needs at least one classification")
    for item in classifications:
        _check(item)
    groups: list[_Group] = [
        _classification_group(item, algorithm, identity, index=index)
        for index, item in enumerate(classifications, start=1)
    ]
    return _report(
        [item.source for item in classifications], groups, algorithm, PLAIN_CHEST_XRAY, identity
    )


def _classification_group(
    item: Classification, algorithm: Algorithm, identity: ReportIdentity, *, index: int
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    source_uid = str(item.source.SOPInstanceUID)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=identity.tracking(
            source_uid, identifier=f"{algorithm.name} image {index}"
        ),
        finding_type=NORMAL if item.ruled_out else item.label.concept(),
        algorithm_id=algorithm.for_sr(
            operating_point=item.operating_point, threshold=repr(float(item.threshold))
        ),
        measurements=[_probability(item.probability, algorithm)],
        source_images=[_source_for_group(item.source)],
    )


def _check(item: Classification) -> None:
    p, t = float(item.probability), float(item.threshold)
    _check_probability(p)
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


def segmentation_report(
    segmented: list[Segmented],
    algorithm: Algorithm,
    identity: ReportIdentity,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report with one ROI group per (source image, label), on its SEG segment.

    Raises ValueError on an empty list, sources of several studies or patients, a SEG that
    does not derive from its source, or a finding whose segment the SEG lacks.
    """
    if not segmented:
        raise ValueError("a segmentation report needs at least one segmented image")
    groups: list[_Group] = []
    for item in segmented:
        _check_segmentation(item)
        for finding in sorted(item.findings, key=lambda f: f.segment_number):
            _check_probability(finding.probability)
            groups.append(_segment_group(item, finding, algorithm, identity))
    return _report(
        [item.source for item in segmented],
        groups,
        algorithm,
        PLAIN_CHEST_XRAY,
        identity,
        derived=[item.segmentation for item in segmented],
    )


def _segment_group(
    item: Segmented, finding: SegmentFinding, algorithm: Algorithm, identity: ReportIdentity
) -> _Group:
    seg, source = item.segmentation, item.source
    number = finding.segment_number
    label = concept(finding.label.code)
    present = finding.operating_points.get("present")
    reached = present.reached if present is not None else finding.probability > 0
    decision = _decision(finding.operating_points, "present")
    frames = segment_frames(seg, number)
    source_image = hd.sr.SourceImageForSegmentation(
        str(source.SOPClassUID), str(source.SOPInstanceUID)
    )
    common = _GroupParts(
        tracking_identifier=identity.tracking(
            str(source.SOPInstanceUID),
            str(number),
            identifier=f"{algorithm.name} {finding.label.name}",
        ),
        finding_type=label,
        algorithm_id=algorithm.for_sr(**decision),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=label, value=PRESENT if reached else ABSENT)
        ],
        measurements=_segment_measurements(finding, algorithm),
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


def _segment_measurements(finding: SegmentFinding, algorithm: Algorithm) -> list[hd.sr.Measurement]:
    values = finding.measurements
    measured = [_probability(finding.probability, algorithm)]
    if "area_mm2" in values:
        measured.append(_measurement(AREA, values["area_mm2"], SQUARE_MM, algorithm))
    if "percent_of_hemithorax" in values:
        measured.append(
            _measurement(PERCENT_OF_HEMITHORAX, values["percent_of_hemithorax"], PERCENT, algorithm)
        )
    return measured


def _check_segmentation(item: Segmented) -> None:
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


def detection_report(
    detections: list[Detection],
    algorithm: Algorithm,
    identity: ReportIdentity,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report: one image-region group per finding, or "absent" per empty volume.

    Raises ValueError on an empty list, sources of several studies or patients, or a box
    or frame outside its source image.
    """
    if not detections:
        raise ValueError("a detection report needs at least one detection")
    groups: list[_Group] = []
    for item in detections:
        _check_probability(item.answer.probability)
        uid = str(item.source.SOPInstanceUID)
        for index, finding in enumerate(item.answer.findings, start=1):
            _check_box(item.source, finding)
            groups.append(_region_group(item.source, finding, algorithm, identity, index=index))
        if not item.answer.findings:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=identity.tracking(
                        uid, identifier=f"{algorithm.name} volume"
                    ),
                    finding_type=concept(item.answer.label.code),
                    algorithm_id=algorithm.for_sr(**_decision(item.answer.operating_points)),
                    qualitative_evaluations=[
                        hd.sr.QualitativeEvaluation(
                            name=concept(item.answer.label.code), value=ABSENT
                        )
                    ],
                    measurements=[_probability(item.answer.probability, algorithm)],
                    source_images=[_source_for_group(item.source)],
                )
            )
    return _report(
        [item.source for item in detections], groups, algorithm, MAMMOGRAPHY, identity
    )


def _region_group(
    source: pydicom.Dataset,
    finding: DetectFinding,
    algorithm: Algorithm,
    identity: ReportIdentity,
    *,
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
    span = list(range(box.first_frame, box.first_frame + box.depth))
    probability = _probability(
        finding.probability,
        algorithm,
        referenced_images=[hd.sr.SourceImageForMeasurement(sop_class, uid, span)],
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=identity.tracking(
            uid, str(index), identifier=f"{algorithm.name} finding {index}"
        ),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=corners,
            source_image=hd.sr.SourceImageForRegion(sop_class, uid, [box.frame]),
        ),
        finding_type=label,
        algorithm_id=algorithm.for_sr(**_decision(finding.operating_points)),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=label, value=PRESENT)],
        measurements=[probability],
    )


def _decision(points: dict[str, PointReached], name: str = "report") -> dict[str, str]:
    """An operating point as TID 4019 parameters, when the answer has it."""
    point = points.get(name)
    return {} if point is None else {"operating_point": name, "threshold": repr(point.threshold)}


def _check_box(source: pydicom.Dataset, finding: DetectFinding) -> None:
    box, frames = finding.box, _frame_count(source)
    rows, columns = int(source.Rows), int(source.Columns)
    _check_probability(finding.probability)
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


def _report(
    sources: list[pydicom.Dataset],
    groups: list[_Group],
    algorithm: Algorithm,
    procedure: hd.sr.CodedConcept | Code,
    identity: ReportIdentity,
    *,
    derived: Sequence[pydicom.Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The report around `groups`: the engine as observer, every source as evidence."""
    check_sources(sources)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["cadnode-device", algorithm.name]),
            name=algorithm.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=algorithm.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None, observer_device_context=observer
        ),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    content_date, content_time = split(identity.content_datetime)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source_header(source) for source in [*sources, *derived]],
        content=report[0],
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.model_name,
        software_versions=cadnode.__version__,
        series_description=f"cadnode {algorithm.name} results",
        # Machine output nobody has signed: complete, but neither final nor verified.
        is_complete=True,
        is_final=False,
        is_verified=False,
        content_date=content_date,
        content_time=content_time,
        coding_schemes=_PRIVATE_SCHEMES if _uses(report[0], PRIVATE_SCHEME) else None,
    )
    if identity.content_datetime is not None:
        stamp(sr, identity.content_datetime)
    return sr


def _probability(
    value: float,
    algorithm: Algorithm,
    referenced_images: Sequence[hd.sr.SourceImageForMeasurement] | None = None,
) -> hd.sr.Measurement:
    """The label's probability: its own TID 4019 with only the model hash (no threshold)."""
    _check_probability(value)
    return _measurement(PROBABILITY, value, NO_UNITS, algorithm, referenced_images)


def _measurement(
    name: hd.sr.CodedConcept | Code,
    value: float,
    unit: Code,
    algorithm: Algorithm,
    referenced_images: Sequence[hd.sr.SourceImageForMeasurement] | None = None,
) -> hd.sr.Measurement:
    if not math.isfinite(value):
        raise ValueError(f"{name.meaning} {value!r} is not a finite number")
    return hd.sr.Measurement(
        name=name,
        value=float(value),
        unit=unit,
        algorithm_id=algorithm.for_sr(),
        referenced_images=referenced_images,
    )


def _source_for_group(source: pydicom.Dataset) -> hd.sr.SourceImageForMeasurementGroup:
    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
    )


def _check_probability(value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"probability {value!r} is not within 0..1")


def _frame_count(source: pydicom.Dataset) -> int:
    return int(getattr(source, "NumberOfFrames", 1) or 1)


def _uses(item: pydicom.Dataset, scheme: str) -> bool:
    """Whether any coded concept below `item` comes from `scheme`."""
    return any(
        element.keyword == "CodingSchemeDesignator" and element.value == scheme
        for element in item.iterall()
    )


def warm_up() -> None:
    """Build one report and drop it. highdicom reads the standard's module tables when it
    makes its first object (about half a second here): done at start, not on a study."""
    source = pydicom.Dataset()
    source.SOPClassUID = DigitalXRayImageStorageForPresentation
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(source, keyword, generate_uid(entropy_srcs=["cadnode-warm-up", keyword]))
    source.Modality = "DX"
    classification = Classification(
        source=source,
        label=CodedLabel(value="263654008", scheme="SCT", meaning="Abnormal"),
        probability=0.5,
        operating_point="warm-up",
        threshold=0.5,
        ruled_out=False,
    )
    identity = ReportIdentity(
        generate_uid(entropy_srcs=["cadnode-warm-up", "series"]),
        generate_uid(entropy_srcs=["cadnode-warm-up", "sr"]),
    )
    classification_report([classification], Algorithm("warm-up", "0", "0" * 64), identity)
