"""A segmenter's masks as a DICOM Segmentation (highdicom `Segmentation`).

A pure builder like `cadnode.encode.sr`: one source image (a film, or a multi-frame volume),
its masks and the answer's findings in; a SEG out, with one segment per label numbered as
the answer numbers them (the manifest's label order), coded with the label's SNOMED CT
code and its category (DICOM CID 7150), identified by the engine's name, version and model
hash (family: Artificial Intelligence), and referencing the source image.

Binary, not fractional: the answer holds masks already cut at each label's pixel threshold
(the "present" operating point), which is what the measurements in the SR were taken on;
a fractional SEG would need the probability maps, which the answer does not keep, and a
binary SEG is bit-packed (an eighth of the size) and shown by every SEG-capable viewer.

Empty segments: highdicom leaves out frames with no segmented pixel. A label found nowhere
(a film without pneumothorax) would then be a segment without a frame, which a viewer
cannot show as "looked, found none" and the SR could not reference frame by frame. So
empty frames are left out only when every segment keeps at least one frame; otherwise all
frames are kept and the empty segment is an explicit empty mask.

Deterministic: UIDs come from the caller, highdicom's random Dimension Organization UID is
replaced by one derived from the SEG's own UID, and `content_datetime` replaces the clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid

import cadnode
from cadnode.encode.provenance import (
    MANUFACTURER,
    Algorithm,
    check_sources,
    concept,
    source_header,
    split,
    stamp,
)
from cadnode.infer.answers import SegmentFinding

SEG_SERIES_NUMBER = 901


def segmentation(
    source: pydicom.Dataset,
    masks: np.ndarray,
    findings: Sequence[SegmentFinding],
    algorithm: Algorithm,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = SEG_SERIES_NUMBER,
    instance_number: int = 1,
    content_datetime: dt.datetime | None = None,
) -> hd.seg.Segmentation:
    """The SEG of `masks`, bool (frames, labels, rows, columns) as `load_masks` returns them.

    `findings` must number the labels 1..labels (segment_number i is masks[:, i - 1]).
    Raises ValueError when the masks do not fit the source or the findings, or a label has
    no category (a segment needs one; the manifest gives it).
    """
    check_sources([source])
    _check_masks(source, masks, findings)
    ordered = sorted(findings, key=lambda finding: finding.segment_number)
    # highdicom wants (frames, rows, columns, segments) for a binary segmentation.
    pixels = np.moveaxis(masks, 1, -1).astype(np.uint8)
    every_segment_has_a_frame = all(masks[:, index].any() for index in range(masks.shape[1]))
    content_date, content_time = split(content_datetime)
    seg = hd.seg.Segmentation(
        # What it copies (patient, study, ...) comes decoded and in UTF-8 from the header.
        source_images=[source_header(source)],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _segment(finding, algorithm, sop_instance_uid) for finding in ordered
        ],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.model_name,
        software_versions=cadnode.__version__,
        device_serial_number=algorithm.version,
        content_label=_content_label(algorithm.name),
        content_description=f"{algorithm.name} {algorithm.version} segmentation"[:64],
        series_description=algorithm.series_description("SEG"),
        omit_empty_frames=every_segment_has_a_frame,
        content_date=content_date,
        content_time=content_time,
    )
    _finish(seg, source, sop_instance_uid)
    if content_datetime is not None:
        stamp(seg, content_datetime)
    return seg


def segment_frames(seg: pydicom.Dataset, segment_number: int) -> list[int]:
    """The 1-based SEG frame numbers holding segment `segment_number`."""
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    numbers = []
    for number, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        # With one segment, highdicom names it once for all frames (shared groups).
        identification = frame.get("SegmentIdentificationSequence") or shared
        if int(identification[0].ReferencedSegmentNumber) == segment_number:
            numbers.append(number)
    return numbers


def _segment(
    finding: SegmentFinding, algorithm: Algorithm, sop_instance_uid: str
) -> hd.seg.SegmentDescription:
    label = finding.label
    assert label.category is not None  # _check_masks refused it
    present = finding.operating_points.get("present")
    parameters = {"threshold": repr(present.threshold)} if present is not None else {}
    return hd.seg.SegmentDescription(
        segment_number=finding.segment_number,
        segment_label=label.name.replace("_", " "),
        segmented_property_category=concept(label.category),
        segmented_property_type=concept(label.code),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.for_seg(**parameters),
        tracking_uid=generate_uid(
            entropy_srcs=["cadnode-segment", sop_instance_uid, str(finding.segment_number)]
        ),
        tracking_id=f"{algorithm.name} {label.name}",
    )


def _finish(seg: hd.seg.Segmentation, source: pydicom.Dataset, sop_instance_uid: str) -> None:
    """What highdicom leaves random or out: the dimension UID, a film's orientation."""
    dimension_uid = generate_uid(entropy_srcs=["cadnode-seg-dimensions", sop_instance_uid])
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_uid
    # Type 2C in General Image where no plane orientation is given (a projection film):
    # the SEG shares its pixel grid with the source, so it shares its orientation too.
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:
        seg.PatientOrientation = source.get("PatientOrientation", None)


def _content_label(name: str) -> str:
    """A Content Label (CS: upper case, digits, space, underscore; 16 characters)."""
    cleaned = "".join(c if c.isalnum() else "_" for c in name.upper())
    return cleaned[:16] or "CADNODE"


def _check_masks(
    source: pydicom.Dataset, masks: np.ndarray, findings: Sequence[SegmentFinding]
) -> None:
    if masks.ndim != 4 or masks.dtype != np.bool_:
        raise ValueError(f"masks must be bool (frames, labels, rows, columns), got {masks.shape}")
    frames, labels, rows, columns = masks.shape
    source_frames = int(getattr(source, "NumberOfFrames", 1) or 1)
    expected = (source_frames, int(source.Rows), int(source.Columns))
    if (frames, rows, columns) != expected:
        raise ValueError(
            f"masks of {frames} frame(s) of {rows}x{columns} do not fit the source image "
            f"({expected[0]} frame(s) of {expected[1]}x{expected[2]})"
        )
    numbers = sorted(finding.segment_number for finding in findings)
    if numbers != list(range(1, labels + 1)):
        raise ValueError(f"findings number segments {numbers}, the masks hold {labels} labels")
    for finding in findings:
        if finding.label.category is None:
            raise ValueError(
                f"label {finding.label.name!r} has no category (CID 7150); "
                "a SEG segment needs one: add it to the engine manifest"
            )
