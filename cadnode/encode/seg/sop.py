"""The Segmentation: a source image's masks as one binary SEG with a segment per label."""

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
    finish,
    source_header,
    split,
)
from cadnode.encode.seg.content import segment_description
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
            segment_description(finding, algorithm, sop_instance_uid) for finding in ordered
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
    finish(seg, algorithm, content_datetime)
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
