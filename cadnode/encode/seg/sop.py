"""The Segmentation: a source image's masks as one SEG with a segment per label, binary (one
frame per label and source frame, lossless) or LABELMAP (one frame per source frame, each
pixel the number of one segment).

Spatial attributes, by DICOM PS3.3 (Table A.51-1, the Frame of Reference Module; Table A.51-2,
the functional groups; A.51.5.1):

- Every SEG frame carries the Derivation Image functional group naming its source image and
  frame, pixel for pixel (highdicom always writes it).
- A source with a Frame of Reference (a tomosynthesis volume) gives the SEG that same Frame of
  Reference ("the segmentation instance shall have the same frame of reference"), and with it
  Pixel Measures and Plane Orientation (Patient) shared and Plane Position (Patient) per
  frame. With Derivation Image present they "may be present"; they are kept because they place
  every frame in the volume without the source, which a viewer stacking the frames needs.
- A source without one (a projection film: Frame of Reference is optional in the DX IOD and a
  projection has no plane in patient space) gives a SEG without one, and Patient Orientation
  copied from the film. The standard then wants no Plane Orientation either (A.51-2: "may be
  present ... if the Frame of Reference is defined in the patient-relative Reference Coordinate
  System"), but cornerstone3D's SEG adapter, which OHIF loads SEGs with, refuses a SEG without
  one; see `_orient_projection` for the one deliberate exception.
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
    finish,
    source_header,
    split,
)
from cadnode.encode.seg.content import segment_description
from cadnode.infer.answers import SegmentFinding

SEG_SERIES_NUMBER = 901
# Row then column direction cosines that viewers assume for an image without any (a film).
PROJECTION_ORIENTATION = ("1", "0", "0", "0", "1", "0")


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
    labelmap: bool = False,
) -> hd.seg.Segmentation:
    """The SEG of `masks`, bool (frames, labels, rows, columns) as `load_masks` returns them.

    `findings` must number the labels 1..labels (segment_number i is masks[:, i - 1]).
    `labelmap` writes a LABELMAP SEG (Supplement 243, Label Map Segmentation Storage) for
    viewers that want one: where masks overlap, the higher segment number wins (`_painted`),
    so it can lose pixels the binary SEG keeps; it is an extra, never the SEG a report cites.
    Raises ValueError when the masks do not fit the source or the findings, or a label has
    no category (a segment needs one; the manifest gives it).
    """
    check_sources([source])
    _check_masks(source, masks, findings)
    ordered = sorted(findings, key=lambda finding: finding.segment_number)
    content_date, content_time = split(content_datetime)
    seg = hd.seg.Segmentation(
        # What it copies (patient, study, ...) comes decoded and in UTF-8 from the header.
        source_images=[source_header(source)],
        pixel_array=_painted(masks) if labelmap else _stacked(masks),
        segmentation_type=(
            hd.seg.SegmentationTypeValues.LABELMAP
            if labelmap
            else hd.seg.SegmentationTypeValues.BINARY
        ),
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
        omit_empty_frames=_omit_empty_frames(masks, labelmap),
        content_date=content_date,
        content_time=content_time,
    )
    _finish(seg, source, sop_instance_uid)
    finish(seg, algorithm, content_datetime)
    return seg


def segment_frames(seg: pydicom.Dataset, segment_number: int) -> list[int]:
    """The 1-based SEG frame numbers holding segment `segment_number` (a binary SEG's)."""
    if seg.get("SegmentationType") == "LABELMAP":
        raise ValueError(
            "a LABELMAP SEG's frames hold every segment, told apart by pixel value only: "
            "reference the binary SEG's frames"
        )
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    numbers = []
    for number, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        # With one segment, highdicom names it once for all frames (shared groups).
        identification = frame.get("SegmentIdentificationSequence") or shared
        if int(identification[0].ReferencedSegmentNumber) == segment_number:
            numbers.append(number)
    return numbers


def _stacked(masks: np.ndarray) -> np.ndarray:
    """highdicom's binary input: (frames, rows, columns, segments)."""
    return np.moveaxis(masks, 1, -1).astype(np.uint8)


def _painted(masks: np.ndarray) -> np.ndarray:
    """One label image per frame: each pixel the number of the highest-numbered segment that
    holds it, 0 where none does.

    A labelmap pixel has one value, and the masks may overlap (each label is cut at its own
    threshold). Painting in segment order lets the later label win: the manifest lists the
    findings (pneumothorax) after the anatomy they lie in (the lungs), so what a reader looks
    for stays visible and the anatomy loses the overlap."""
    frames, labels, rows, columns = masks.shape
    painted = np.zeros((frames, rows, columns), dtype=np.uint8 if labels < 256 else np.uint16)
    for index in range(labels):
        painted[masks[:, index]] = index + 1
    return painted


def _omit_empty_frames(masks: np.ndarray, labelmap: bool) -> bool:
    """Whether highdicom may leave out frames without a segmented pixel.

    Binary: only when every segment keeps a frame, so that a label found nowhere stays an
    explicit empty mask ("looked, found none") the SR can point to. LABELMAP: a frame holds
    every segment, so an empty one is background and goes, unless nothing was found at all
    (a SEG needs at least one frame)."""
    if labelmap:
        return bool(masks.any())
    return all(bool(masks[:, index].any()) for index in range(masks.shape[1]))


def _finish(seg: hd.seg.Segmentation, source: pydicom.Dataset, sop_instance_uid: str) -> None:
    """What highdicom leaves random or out: the dimension UID, a film's orientation and
    spacing."""
    dimension_uid = generate_uid(entropy_srcs=["cadnode-seg-dimensions", sop_instance_uid])
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_uid
    if "FrameOfReferenceUID" not in seg:
        # Type 2C in General Image where no plane orientation is required (a projection
        # film): the SEG shares its pixel grid with the source, so its orientation too.
        if "PatientOrientation" not in seg:
            seg.PatientOrientation = source.get("PatientOrientation", None)
        _orient_projection(seg, source)


def _orient_projection(seg: hd.seg.Segmentation, source: pydicom.Dataset) -> None:
    r"""Give a SEG without a Frame of Reference a shared Plane Orientation (Patient): the
    source's Image Orientation (Patient) if it has one, else 1\0\0\0\1\0.

    Why, against the letter of PS3.3 Table A.51-2 (which allows the macro only with a
    patient-relative Frame of Reference): cornerstone3D's SEG adapter (what OHIF runs) reads
    the SEG's orientation before anything else and fails on a SEG without one ("Cannot read
    properties of undefined (reading 'ImageOrientationPatient')"); it then accepts the SEG
    only when that orientation is in plane with the one the viewer gives the source, and for
    an image without one OHIF and cornerstone assume 1\0\0\0\1\0 (a film's true directions,
    from its Patient Orientation, would be a coronal plane: "perpendicular", refused). So the
    value is the viewers' convention, not anatomy: Patient Orientation, copied from the film,
    stays the anatomical statement, and Derivation Image ties each pixel to the film's.

    Why not a Frame of Reference of the SEG's own, which would make the macro permitted: it
    would add a false claim to the same convention. The film has none to share; a SEG series
    holds the SEGs of all of a study's films, a series has one Frame of Reference (C.7.4.1.1.1),
    and one shared Frame of Reference says its images are spatially related in patient space,
    which two films are not. dciodvfy (2022) accepts either way."""
    orientation = pydicom.Dataset()
    orientation.ImageOrientationPatient = list(
        source.get("ImageOrientationPatient", PROJECTION_ORIENTATION)
    )
    shared = seg.SharedFunctionalGroupsSequence[0]
    shared.PlaneOrientationSequence = [orientation]
    if spacing := _film_spacing(source):
        measures = pydicom.Dataset()
        measures.PixelSpacing = spacing
        # Type 1C, so a value or nothing; nothing makes highdicom's reader refuse the SEG.
        # A film has no slice: its own value where it states one, else 1 mm, a placeholder
        # no viewer measures with (docs/conformance.md says so).
        measures.SliceThickness = source.get("SliceThickness") or "1"
        shared.PixelMeasuresSequence = [measures]


def _film_spacing(source: pydicom.Dataset) -> list[str] | None:
    """The film's pixel spacing for the shared Pixel Measures, by the same viewers' convention
    as the orientation: OHIF's SEG viewport reads it before it draws anything, and without it
    shows an error instead of the masks. Pixel Spacing where the film has it, else Imager
    Pixel Spacing (at the detector: what a viewer measures a film with, PS3.3 10.7.1.3);
    none where the film says nothing, rather than an invented one."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in source and source[keyword].VM == 2:
            return [str(value) for value in source[keyword].value]
    return None


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
