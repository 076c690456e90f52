"""The Secondary Capture: the findings drawn over a source frame, saying what it is."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

import cadnode
from cadnode.encode.overlay import BoxSpec, render_overlay
from cadnode.encode.provenance import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    Algorithm,
    check_sources,
    finish,
    source_header,
)

SC_SERIES_NUMBER = 902


def capture_caption(algorithm: Algorithm) -> str:
    return f"cadnode {algorithm.name} {algorithm.version} - {NOT_FOR_DIAGNOSIS}"


def secondary_capture(
    source: pydicom.Dataset,
    algorithm: Algorithm,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    frame: int = 1,
    masks: np.ndarray | None = None,
    boxes: Sequence[BoxSpec] = (),
    summary: str = "",
    series_number: int = SC_SERIES_NUMBER,
    instance_number: int = 1,
    content_datetime: dt.datetime | None = None,
    limit: int,
) -> hd.sc.SCImage:
    """The source's 1-based `frame` with `masks` (labels, rows, columns) and `boxes` drawn.

    The caption names the engine and says it is not for primary diagnosis; `summary` (e.g.
    "pneumothorax present 12.5% of hemithorax") follows it.

    `source` needs its pixel data, decoded within `limit` bytes (cadnode.dicom.pixels). Raises
    ValueError for a frame outside the image or masks that do not fit it.
    """
    check_sources([source])
    caption = capture_caption(algorithm) + (f": {summary}" if summary else "")
    pixels = render_overlay(
        source, frame=frame, masks=masks, boxes=boxes, caption=caption, limit=limit
    )
    header = source_header(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom insists on an orientation; one the source does not give is left empty
        # below (type 2: unknown) rather than invented.
        patient_orientation=_orientation(source) or ("L", "F"),
        laterality=_laterality(source),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    if _orientation(source) is None:
        sc.PatientOrientation = []  # type 2: empty = unknown
    if "BodyPartExamined" in source:  # lets a reader tell a paired body part (laterality)
        sc.BodyPartExamined = source.BodyPartExamined
    if "Laterality" not in sc and not _unpaired(source):
        sc.Laterality = ""  # type 2C: a paired part whose side the source does not name
    sc.ManufacturerModelName = algorithm.model_name
    sc.SoftwareVersions = cadnode.__version__
    sc.SeriesDescription = algorithm.series_description("overlay")
    sc.ConversionType = "WSD"  # drawn by software (a workstation), not digitised film
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.DerivationDescription = (
        f"{algorithm.name} {algorithm.version} findings (model sha256 {algorithm.sha256}) "
        f"drawn over frame {frame} of the source image"
    )[:1024]
    sc.SourceImageSequence = [_source_reference(source, frame)]
    if content_datetime is not None:
        sc.ContentDate = pydicom.valuerep.DA(content_datetime.date())
        sc.ContentTime = pydicom.valuerep.TM(content_datetime.time())
    finish(sc, algorithm, content_datetime)
    return sc


def _orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """The picture's row and column directions: a film's Patient Orientation, else the
    letters of the main axis of a volume's plane orientation (e.g. [1,0,0,0,1,0] -> L, P)."""
    orientation = source.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2:
        return str(orientation[0]), str(orientation[1])
    cosines = _plane_orientation(source)
    if cosines is None:
        return None
    return _direction(cosines[:3]), _direction(cosines[3:])


def _plane_orientation(source: pydicom.Dataset) -> list[float] | None:
    if "ImageOrientationPatient" in source:
        return [float(v) for v in source.ImageOrientationPatient]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in source.get(groups, [])[:1]:
            for plane in item.get("PlaneOrientationSequence", []):
                return [float(v) for v in plane.ImageOrientationPatient]
    return None


def _direction(vector: list[float]) -> str:
    """DICOM patient axes: +x left, +y posterior, +z head."""
    axis = int(np.argmax(np.abs(vector)))
    positive = vector[axis] > 0
    return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if positive else 1]


def _laterality(source: pydicom.Dataset) -> str | None:
    for value in _lateralities(source):
        if value in ("L", "R"):
            return value
    return None


def _unpaired(source: pydicom.Dataset) -> bool:
    return "U" in _lateralities(source)


def _lateralities(source: pydicom.Dataset) -> list[str]:
    """Laterality, Image Laterality, and a multi-frame image's shared Frame Laterality."""
    found = [str(source.get(keyword, "")) for keyword in ("Laterality", "ImageLaterality")]
    for item in source.get("SharedFunctionalGroupsSequence", [])[:1]:
        for anatomy in item.get("FrameAnatomySequence", []):
            found.append(str(anatomy.get("FrameLaterality", "")))
    return [value for value in found if value]


def _source_reference(source: pydicom.Dataset, frame: int) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if int(getattr(source, "NumberOfFrames", 1) or 1) > 1:
        item.ReferencedFrameNumber = frame
    purpose = codes.DCM.SourceImageForImageProcessingOperation
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator = purpose.value, purpose.scheme_designator
    code.CodeMeaning = purpose.meaning
    item.PurposeOfReferenceCodeSequence = [code]
    return item
