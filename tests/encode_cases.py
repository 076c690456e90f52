"""Engine answers built by hand over real phantom images, for the encode tests.

The masks come from the chest phantom generator (its lungs and pneumothorax), the boxes from
the breast phantom's masses, so the objects encode what an engine would have found.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

from cadnode.encode.provenance import Algorithm
from cadnode.encode.seg import segmentation
from cadnode.encode.sr import ReportIdentity, Segmented, segmentation_report
from cadnode.infer.answers import (
    Box,
    DetectAnswer,
    DetectFinding,
    PointReached,
    SegmentAnswer,
    SegmentFinding,
)
from cadnode.infer.bundle import Code, Label
from cadnode.infer.phantoms.breast import BreastPhantom, write_tomosynthesis
from cadnode.infer.phantoms.chest import make_chest_phantom, write_chest_radiograph

SEGMENTER = Algorithm(name="cxr-segmenter", version="0.1.0", sha256="ab" * 32)
DETECTOR = Algorithm(name="dbt-detector", version="0.1.0", sha256="cd" * 32)

_ANATOMY = Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
_ABNORMAL = Code(value="49755003", scheme="SCT", meaning="Morphologically Abnormal Structure")
LABELS = [
    Label(
        name="right_lung",
        code=Code(value="3341006", scheme="SCT", meaning="Right lung"),
        category=_ANATOMY,
    ),
    Label(
        name="left_lung",
        code=Code(value="44029006", scheme="SCT", meaning="Left lung"),
        category=_ANATOMY,
    ),
    Label(
        name="pneumothorax",
        code=Code(value="36118008", scheme="SCT", meaning="Pneumothorax"),
        category=_ABNORMAL,
    ),
]
MASS = Label(
    name="mass",
    code=Code(value="129788004", scheme="SCT", meaning="Mammographic breast mass"),
    category=_ABNORMAL,
)
FILM_SIZE = 256


def film_with_masks(
    folder: Path, *, pneumothorax: bool, seed: int = 3, study_uid: str | None = None
) -> tuple[pydicom.Dataset, np.ndarray]:
    """A chest film as received (written, read back) and its masks (1, 3, rows, columns)."""
    path = folder / f"film-{seed}-{pneumothorax}.dcm"
    write_chest_radiograph(
        path,
        seed=seed,
        pneumothorax=pneumothorax,
        size=FILM_SIZE,
        patient_id="PID-7",
        patient_name="Doe^Jane",
    )
    if study_uid is not None:  # a second film of the same study
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.save_as(path)
    phantom = make_chest_phantom(seed, size=FILM_SIZE, pneumothorax=pneumothorax)
    ptx = phantom.pneumothorax_mask
    masks = np.stack([phantom.right_lung_mask & ~ptx, phantom.left_lung_mask & ~ptx, ptx])
    return pydicom.dcmread(path), masks[None]


def segment_findings(source: pydicom.Dataset, masks: np.ndarray) -> list[SegmentFinding]:
    """What the segmenter reports for `masks`: areas from the film's pixel spacing."""
    row_mm, column_mm = (float(v) for v in source.ImagerPixelSpacing)
    findings = []
    areas = masks.sum(axis=(0, 2, 3))
    half = masks.shape[-1] // 2
    for index, label in enumerate(LABELS):
        area = float(areas[index])
        measurements = {"area_px": area, "area_mm2": area * row_mm * column_mm}
        if label.name == "pneumothorax":
            ptx = masks[0, 2]
            side = 0 if ptx[:, :half].sum() >= ptx[:, half:].sum() else 1
            lung = float(areas[side])
            measurements["percent_of_hemithorax"] = 100 * area / (area + lung) if area else 0.0
        findings.append(
            SegmentFinding(
                label=label,
                segment_number=index + 1,
                probability=0.93 if area else 0.0,
                operating_points={"present": PointReached(threshold=0.5, reached=area > 0)},
                measurements=measurements,
            )
        )
    return findings


def segment_answer(source: pydicom.Dataset, masks: np.ndarray, mask_file: str) -> SegmentAnswer:
    return SegmentAnswer(
        mask_file=mask_file,
        frames=masks.shape[0],
        rows=masks.shape[2],
        columns=masks.shape[3],
        pixel_spacing_mm=tuple(float(v) for v in source.ImagerPixelSpacing),  # type: ignore[arg-type]
        findings=segment_findings(source, masks),
    )


def volume(folder: Path, *, masses: int, seed: int = 5) -> tuple[pydicom.Dataset, list[Box]]:
    """A 16-frame 128x128 tomosynthesis volume as received, and its masses as boxes."""
    path = folder / f"volume-{seed}-{masses}.dcm"
    _, phantom = write_tomosynthesis(path, seed=seed, masses=masses, patient_id="PID-8")
    return pydicom.dcmread(path), mass_boxes(phantom)


def detect_answer(source: pydicom.Dataset, boxes: list[Box]) -> DetectAnswer:
    report = PointReached(threshold=0.47, reached=True)
    findings = [
        DetectFinding(
            label=MASS, probability=0.9 - 0.1 * i, operating_points={"report": report}, box=box
        )
        for i, box in enumerate(boxes)
    ]
    best = max((f.probability for f in findings), default=0.0)
    return DetectAnswer(
        frames=int(source.NumberOfFrames),
        rows=int(source.Rows),
        columns=int(source.Columns),
        label=MASS,
        probability=best,
        operating_points={"report": PointReached(threshold=0.47, reached=bool(findings))},
        findings=findings,
    )


def volume_in_study(
    folder: Path, study_uid: str, *, view: str, masses: int, seed: int
) -> tuple[pydicom.Dataset, list[Box]]:
    """Another volume (another view) of the study `study_uid`, as received, and its masses
    as boxes (as `volume` makes them)."""
    path = folder / f"volume-{seed}-{view}.dcm"
    _, phantom = write_tomosynthesis(
        path, seed=seed, masses=masses, patient_id="PID-8", study_uid=study_uid, view=view
    )
    return pydicom.dcmread(path), mass_boxes(phantom)


def mass_boxes(phantom: BreastPhantom) -> list[Box]:
    """The phantom's masses as the detector's boxes: each on its slice, spanning up to 3."""
    frames = phantom.volume.shape[0]
    boxes = []
    for mass in phantom.masses:
        first = max(1, mass.slice)  # 0-based slice: frames slice .. slice + 2 (1-based)
        boxes.append(
            Box(
                x=mass.x,
                y=mass.y,
                width=mass.width,
                height=mass.height,
                frame=mass.slice + 1,
                first_frame=first,
                depth=min(3, frames - first + 1),
            )
        )
    return boxes


def segmented_film(
    folder: Path, *, pneumothorax: bool, uid: Callable[[str], str], when: dt.datetime
) -> tuple[pydicom.Dataset, pydicom.Dataset, pydicom.Dataset]:
    """A phantom film in `folder`, its SEG and the segmenter's report on it, with UIDs from
    `uid` and made at `when`: (film, SEG, SR)."""
    film, masks = film_with_masks(folder, pneumothorax=pneumothorax)
    findings = segment_findings(film, masks)
    seg = segmentation(
        film,
        masks,
        findings,
        SEGMENTER,
        series_instance_uid=uid("seg-series"),
        sop_instance_uid=uid("seg"),
        content_datetime=when,
    )
    sr = segmentation_report(
        [Segmented(film, findings, seg)],
        SEGMENTER,
        ReportIdentity(uid("sr-series"), uid("sr"), content_datetime=when),
    )
    return film, seg, sr
