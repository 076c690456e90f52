"""The three TID 1500 reports (classifier, segmenter, detector) and the Comprehensive 3D SR
that holds each: the engine as observer, every source as evidence, the groups as content."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

import cadnode
from cadnode.encode.provenance import (
    MANUFACTURER,
    Algorithm,
    CodedLabel,
    check_sources,
    finish,
    source_header,
    split,
)
from cadnode.encode.sr.codes import MAMMOGRAPHY, PLAIN_CHEST_XRAY, PRIVATE_SCHEME, PRIVATE_SCHEMES
from cadnode.encode.sr.content import (
    Classification,
    Detection,
    MeasurementGroup,
    ReportIdentity,
    Segmented,
    absent_group,
    check_box,
    check_classification,
    check_probability,
    check_segmentation,
    classification_group,
    region_group,
    segment_group,
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
        check_classification(item)
    groups: list[MeasurementGroup] = [
        classification_group(item, algorithm, identity, index=index)
        for index, item in enumerate(classifications, start=1)
    ]
    return _report(
        [item.source for item in classifications], groups, algorithm, PLAIN_CHEST_XRAY, identity
    )


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
    groups: list[MeasurementGroup] = []
    for item in segmented:
        check_segmentation(item)
        for finding in sorted(item.findings, key=lambda f: f.segment_number):
            check_probability(finding.probability)
            groups.append(segment_group(item, finding, algorithm, identity))
    return _report(
        [item.source for item in segmented],
        groups,
        algorithm,
        PLAIN_CHEST_XRAY,
        identity,
        derived=[item.segmentation for item in segmented],
    )


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
    groups: list[MeasurementGroup] = []
    for item in detections:
        check_probability(item.answer.probability)
        for index, finding in enumerate(item.answer.findings, start=1):
            check_box(item.source, finding)
            groups.append(region_group(item.source, finding, algorithm, identity, index=index))
        if not item.answer.findings:
            groups.append(absent_group(item, algorithm, identity))
    return _report([item.source for item in detections], groups, algorithm, MAMMOGRAPHY, identity)


# --- shared -------------------------------------------------------------------------------


def _report(
    sources: list[pydicom.Dataset],
    groups: list[MeasurementGroup],
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
        coding_schemes=PRIVATE_SCHEMES if _uses(report[0], PRIVATE_SCHEME) else None,
    )
    finish(sr, algorithm, identity.content_datetime)
    return sr


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
