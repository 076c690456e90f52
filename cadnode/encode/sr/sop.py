"""The three TID 1500 reports (classifier, segmenter, detector) and the Comprehensive 3D SR
that holds each: the engine as observer, every source as evidence, the groups as content."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
from cadnode.encode.sr.codes import (
    LATERALITIES,
    MAMMOGRAPHY,
    MILLIMETER,
    MODALITIES,
    PIXELS,
    PLAIN_CHEST_XRAY,
    PRIVATE_SCHEME,
    PRIVATE_SCHEMES,
)
from cadnode.encode.sr.content import (
    Classification,
    Detection,
    MeasurementGroup,
    ReportIdentity,
    Segmented,
    absent_group,
    box_frames,
    check_box,
    check_classification,
    check_probability,
    check_segmentation,
    classification_group,
    finding_groups,
    region_group,
    segment_group,
)
from cadnode.encode.sr.document import report_document
from cadnode.infer.answers import DetectFinding
from cadnode.infer.preprocess import frame_pixel_spacing_mm

# --- classifier ---------------------------------------------------------------------------


def classification_report(
    classifications: list[Classification],
    algorithm: Algorithm,
    identity: ReportIdentity,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report with one measurement group per classified source image, followed
    by one group per finding a multi-label engine reports on it (content.finding_groups).

    All sources must belong to one study (the SR joins that study).
    Raises ValueError on an empty list, mixed studies or patients, a repeated source,
    an out-of-range probability or threshold, or a `ruled_out` that contradicts them.
    """
    if not classifications:
        raise ValueError("a classification report needs at least one classification")
    for item in classifications:
        check_classification(item)
    groups: list[MeasurementGroup] = []
    for index, item in enumerate(classifications, start=1):
        groups.append(classification_group(item, algorithm, identity, index=index))
        groups.extend(finding_groups(item, algorithm, identity, index=index))
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
    for image, item in enumerate(segmented, start=1):
        check_segmentation(item)
        for finding in sorted(item.findings, key=lambda f: f.segment_number):
            check_probability(finding.probability)
            groups.append(segment_group(item, finding, algorithm, identity, image=image))
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
    frames: dict[str, list[int]] = {}
    for volume, item in enumerate(detections, start=1):
        check_probability(item.answer.probability)
        for index, finding in enumerate(item.answer.findings, start=1):
            check_box(item.source, finding)
            groups.append(
                region_group(item.source, finding, algorithm, identity, volume=volume, index=index)
            )
        if not item.answer.findings:
            groups.append(absent_group(item, algorithm, identity, volume=volume))
        frames[str(item.source.SOPInstanceUID)] = referenced_frames(item.answer.findings)
    sources = [item.source for item in detections]
    return _report(sources, groups, algorithm, MAMMOGRAPHY, identity, frames=frames)


def referenced_frames(findings: Sequence[DetectFinding]) -> list[int]:
    """The frames of a volume the report points at: each finding's region frame and span."""
    return sorted({frame for f in findings for frame in (f.box.frame, *box_frames(f.box))})


# --- shared -------------------------------------------------------------------------------


def _report(
    sources: list[pydicom.Dataset],
    groups: list[MeasurementGroup],
    algorithm: Algorithm,
    procedure: hd.sr.CodedConcept | Code,
    identity: ReportIdentity,
    *,
    derived: Sequence[pydicom.Dataset] = (),
    frames: Mapping[str, list[int]] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The report around `groups`: the engine as observer, every source as evidence and in
    the Image Library (with the frames of it the report points at, by SOP Instance UID)."""
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
    _add_library(report, image_library(sources, frames or {}))
    content_date, content_time = split(identity.content_datetime)
    sr = report_document(
        [source_header(source) for source in [*sources, *derived]],
        report[0],
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


# --- image library (TID 1600) -------------------------------------------------------------

_ACQUISITION = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
# TID 1601's image item, named as highdicom names it.
_LIBRARY_ENTRY = hd.sr.CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")


def image_library(
    sources: Sequence[pydicom.Dataset], frames: Mapping[str, list[int]]
) -> hd.sr.ContainerContentItem:
    """TID 1600: one Image Library Group with an entry (TID 1601) per source image, each
    described (TID 1602, 1603) from its header; a multi-frame source names the frames the
    report points at (none named: the whole image). One group for all: OHIF reads the
    library's first group only. Built here rather than by highdicom's `ImageLibrary`,
    which names no frames, laterality or view and fails on a tomosynthesis volume."""
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=_CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence(
        [_library_entry(source, frames.get(str(source.SOPInstanceUID))) for source in sources]
    )
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _library_entry(source: pydicom.Dataset, frames: list[int] | None) -> hd.sr.ImageContentItem:
    entry = hd.sr.ImageContentItem(
        name=_LIBRARY_ENTRY,
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
        referenced_frame_numbers=frames or None,
        relationship_type=_CONTAINS,
    )
    entry.ContentSequence = hd.sr.ContentSequence(
        [*_image_descriptors(source), *_projection_descriptors(source)]
    )
    return entry


def _image_descriptors(source: pydicom.Dataset) -> list[hd.sr.ContentItem]:
    """TID 1602: modality, target region, laterality, matrix, frame of reference."""
    items: list[hd.sr.ContentItem] = []
    modality = MODALITIES.get(str(source.get("Modality", "")))
    if modality is not None:
        items.append(_coded(codes.DCM.Modality, modality))
    region = _first_code(_frame_anatomy(source).get("AnatomicRegionSequence"))
    if region is not None:
        items.append(_coded(codes.DCM.TargetRegion, region))
    laterality = LATERALITIES.get(_laterality(source))
    if laterality is not None:
        items.append(_coded(codes.DCM.ImageLaterality, laterality))
    for name, keyword in (
        (codes.DCM.PixelDataRows, "Rows"),
        (codes.DCM.PixelDataColumns, "Columns"),
    ):
        if source.get(keyword) is not None:
            items.append(_number(name, int(source.get(keyword)), PIXELS))
    if source.get("FrameOfReferenceUID"):
        items.append(
            hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID,
                value=str(source.FrameOfReferenceUID),
                relationship_type=_ACQUISITION,
            )
        )
    return items


def _projection_descriptors(source: pydicom.Dataset) -> list[hd.sr.ContentItem]:
    """TID 1603: view, orientation and pixel spacing (as the areas were measured with);
    for a volume also its slice thickness and spacing (TID 1604 rows)."""
    items: list[hd.sr.ContentItem] = []
    view = _first_code(source.get("ViewCodeSequence"))
    if view is not None:
        item = _coded(codes.DCM.ImageView, view)
        modifiers = source.ViewCodeSequence[0].get("ViewModifierCodeSequence", [])
        if modifiers:
            item.ContentSequence = hd.sr.ContentSequence(
                [_coded(codes.DCM.ImageViewModifier, _code_of(m), mod=True) for m in modifiers]
            )
        items.append(item)
    orientation = source.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2:
        for name, value in zip(
            (codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn),
            orientation,
            strict=True,
        ):
            items.append(
                hd.sr.TextContentItem(name=name, value=str(value), relationship_type=_ACQUISITION)
            )
    spacing = frame_pixel_spacing_mm(source)
    if spacing is not None:
        items += [
            _number(codes.DCM.HorizontalPixelSpacing, spacing[1], MILLIMETER),
            _number(codes.DCM.VerticalPixelSpacing, spacing[0], MILLIMETER),
        ]
    measures = _shared(source, "PixelMeasuresSequence")
    for name, keyword in (
        (codes.DCM.SliceThickness, "SliceThickness"),
        (codes.DCM.SpacingBetweenSlices, "SpacingBetweenSlices"),
    ):
        if measures.get(keyword) is not None:
            items.append(_number(name, float(measures.get(keyword)), MILLIMETER))
    return items


def _laterality(source: pydicom.Dataset) -> str:
    """Image Laterality, else a multi-frame image's Frame Laterality."""
    value = source.get("ImageLaterality") or _frame_anatomy(source).get("FrameLaterality")
    return str(value or "")


def _frame_anatomy(source: pydicom.Dataset) -> pydicom.Dataset:
    """Where a source says what it shows: a multi-frame image's shared Frame Anatomy, else
    its top level."""
    return _shared(source, "FrameAnatomySequence") or source


def _shared(source: pydicom.Dataset, keyword: str) -> pydicom.Dataset:
    """The shared functional group `keyword` of a multi-frame image (empty if none)."""
    for shared in source.get("SharedFunctionalGroupsSequence", []):
        items: list[pydicom.Dataset] = list(shared.get(keyword, []))
        if items:
            return items[0]
    return pydicom.Dataset()


def _first_code(sequence: Sequence[pydicom.Dataset] | None) -> hd.sr.CodedConcept | None:
    return _code_of(sequence[0]) if sequence else None


def _code_of(item: pydicom.Dataset) -> hd.sr.CodedConcept:
    """The code alone: a copy of the whole item would carry its other attributes too (a
    view's empty View Modifier Code Sequence, which has no place in an SR)."""
    return hd.sr.CodedConcept(
        value=str(item.CodeValue),
        scheme_designator=str(item.CodingSchemeDesignator),
        meaning=str(item.CodeMeaning),
    )


def _coded(
    name: Code, value: hd.sr.CodedConcept | Code, *, mod: bool = False
) -> hd.sr.CodeContentItem:
    relationship = hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD if mod else _ACQUISITION
    return hd.sr.CodeContentItem(name=name, value=value, relationship_type=relationship)


def _number(name: Code, value: float, unit: hd.sr.CodedConcept | Code) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=value, unit=unit, relationship_type=_ACQUISITION)


def _add_library(report: hd.sr.MeasurementReport, library: hd.sr.ContainerContentItem) -> None:
    """TID 1500 row 6: the library goes before the Imaging Measurements (order matters)."""
    items = report[0].ContentSequence
    measurements = codes.DCM.ImagingMeasurements.value
    at = next(
        index
        for index, item in enumerate(items)
        if item.ConceptNameCodeSequence[0].CodeValue == measurements
    )
    items.insert(at, library)


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
    source.Rows = source.Columns = 8
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
