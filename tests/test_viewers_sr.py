"""cadnode's TID 1500 reports read as OHIF reads them (tests/viewers/sr_read.mjs).

The three reports the encode stage writes (classifier, segmenter, DBT detector), built over
phantom images, are walked by OHIF's DICOM SR handler ported to Node.js with dcmjs: the Image
Library, the measurement groups merged by tracking UID, each SCOORD placed on the image and
frame it names among the source images. What the script prints must say what the report says,
and it must fail where OHIF would throw or skip, or where a SCOORD's image is missing from the
Image Library or the evidence.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from cadnode.encode.provenance import Algorithm
from cadnode.encode.sr import (
    Classification,
    CodedLabel,
    Detection,
    ReportIdentity,
    classification_report,
    detection_report,
)
from cadnode.infer.answers import Box
from tests.dicom_validation import saved
from tests.encode_cases import (
    DETECTOR,
    detect_answer,
    film_with_masks,
    segmented_film,
    volume,
)
from tests.viewers.node import Ran, run_script

WHEN = dt.datetime(2026, 1, 2, 9, 30, 0)
RULEOUT = Algorithm(name="cxr-ruleout", version="0.1.0", sha256="ef" * 32)
ABNORMAL = CodedLabel(value="263654008", scheme="SCT", meaning="Abnormal")


def uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["test-viewers-sr", *parts])


@dataclass(frozen=True)
class Built:
    """A report on disk, the source images it is about, and what it was built from."""

    report: Path
    sources: list[Path]
    source: pydicom.Dataset
    seg: pydicom.Dataset | None = None
    boxes: tuple[Box, ...] = ()


def classified(folder: Path) -> Built:
    film, _ = film_with_masks(folder, pneumothorax=True)
    answer = Classification(
        source=film,
        label=ABNORMAL,
        probability=0.81,
        operating_point="rule_out",
        threshold=0.47,
        ruled_out=False,
    )
    sr = classification_report(
        [answer], RULEOUT, ReportIdentity(uid("c-series"), uid("c"), content_datetime=WHEN)
    )
    return Built(saved(sr, folder / "classification.dcm"), [folder / "film-3-True.dcm"], film)


def segmented(folder: Path) -> Built:
    film, seg, sr = segmented_film(folder, pneumothorax=True, uid=uid, when=WHEN)
    return Built(
        saved(sr, folder / "segmentation.dcm"), [folder / "film-3-True.dcm"], film, seg=seg
    )


def detected(folder: Path) -> Built:
    source, boxes = volume(folder, masses=2, seed=6)
    sr = detection_report(
        [Detection(source, detect_answer(source, boxes))],
        DETECTOR,
        ReportIdentity(uid("d-series"), uid("d"), content_datetime=WHEN),
    )
    return Built(
        saved(sr, folder / "detection.dcm"),
        [folder / "volume-6-2.dcm"],
        source,
        boxes=tuple(boxes),
    )


def read(built: Built) -> Ran:
    return run_script("sr_read.mjs", built.report, *built.sources)


def walked(built: Built) -> dict[str, Any]:
    """The plain walk of the report (its Image Library, groups and evidence)."""
    ran = read(built)
    assert ran.printed is not None, ran.stderr
    report: dict[str, Any] = ran.printed["report"]
    return report


def assert_library_holds(report: dict[str, Any], source: pydicom.Dataset) -> None:
    assert [entry["sopInstanceUID"] for entry in report["imageLibrary"]] == [source.SOPInstanceUID]
    assert source.SOPInstanceUID in report["evidence"]


def assert_tracked(groups: list[dict[str, Any]]) -> None:
    for group in groups:
        assert group["trackingIdentifier"], group
        assert group["trackingUID"], group
    assert len({group["trackingUID"] for group in groups}) == len(groups)


# --- what the reports say, read with dcmjs ---------------------------------------------------


def test_classification_report_reads_as_written(tmp_path: Path) -> None:
    built = classified(tmp_path)
    report = walked(built)
    assert_library_holds(report, built.source)
    [group] = report["groups"]
    assert_tracked([group])
    assert group["finding"]["meaning"] == "Abnormal"
    [probability] = group["nums"]
    assert (probability["concept"]["value"], probability["unit"]) == ("122157", "1")
    assert probability["value"] == pytest.approx(0.81)
    assert group["scoords"] == []


def test_segmentation_report_reads_as_written(tmp_path: Path) -> None:
    built = segmented(tmp_path)
    assert built.seg is not None
    report = walked(built)
    assert_library_holds(report, built.source)
    groups = report["groups"]
    assert [g["finding"]["meaning"] for g in groups] == ["Right lung", "Left lung", "Pneumothorax"]
    assert_tracked(groups)
    for number, group in enumerate(groups, start=1):
        segment_frame, source_image = group["images"]
        assert segment_frame["sopInstanceUID"] == built.seg.SOPInstanceUID
        assert segment_frame["frames"] == [number]  # the SEG frame holding this segment
        assert source_image["sopInstanceUID"] == built.source.SOPInstanceUID
        area = next(n for n in group["nums"] if n["concept"]["meaning"] == "Area")
        assert area["unit"] == "mm2" and area["value"] > 0
        [presence] = group["qualitative"]
        assert presence["value"]["meaning"] == "Present"


def test_detection_report_reads_as_written(tmp_path: Path) -> None:
    built = detected(tmp_path)
    report = walked(built)
    assert_library_holds(report, built.source)
    groups = report["groups"]
    assert len(groups) == len(built.boxes) == 2
    assert_tracked(groups)
    for group, box in zip(groups, built.boxes, strict=True):
        [region] = group["scoords"]
        assert (region["graphicType"], region["points"]) == ("POLYLINE", 5)
        assert region["image"]["sopInstanceUID"] == built.source.SOPInstanceUID
        assert region["image"]["frames"] == [box.frame]


# --- what OHIF makes of them -----------------------------------------------------------------


def test_ohif_places_each_detection_on_its_frame(tmp_path: Path) -> None:
    built = detected(tmp_path)
    ran = read(built)
    assert (ran.status, ran.printed["problems"]) == (0, []), ran.stderr
    measurements = ran.printed["ohif"]["measurements"]
    assert len(measurements) == len(built.boxes)
    for measurement, box in zip(measurements, built.boxes, strict=True):
        assert measurement["trackingIdentifier"]
        placed = {"sopInstanceUID": built.source.SOPInstanceUID, "frame": box.frame}
        assert measurement["placed"] == placed
        assert [label["label"] for label in measurement["labels"]] == ["Probability"]
    [library] = ran.printed["ohif"]["referencedImages"]
    assert library["ReferencedSOPInstanceUID"] == built.source.SOPInstanceUID


def test_ohif_loads_the_classification_report(tmp_path: Path) -> None:
    built = classified(tmp_path)
    ran = read(built)
    assert (ran.status, ran.printed["problems"]) == (0, []), ran.stderr
    # An image-level finding (TID 1501) has no region: OHIF lists it and places nothing.
    [measurement] = ran.printed["ohif"]["measurements"]
    assert (measurement["coords"], measurement["placed"]) == ([], None)
    assert measurement["labels"] == [{"label": "Probability", "value": "0.81 1"}]


def test_ohif_loads_the_segmentation_report(tmp_path: Path) -> None:
    built = segmented(tmp_path)
    ran = read(built)
    assert (ran.status, ran.printed["problems"]) == (0, []), ran.stderr
    measurements = ran.printed["ohif"]["measurements"]
    assert len(measurements) == 3
    assert all(measurement["trackingIdentifier"] for measurement in measurements)


# --- and that the reader fails where OHIF would -----------------------------------------------


def test_a_report_without_an_image_library_fails(tmp_path: Path) -> None:
    built = detected(tmp_path)
    ds = pydicom.dcmread(built.report)
    ds.ContentSequence = [
        item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue != "111028"
    ]
    ds.save_as(built.report)
    ran = read(built)
    assert ran.status == 1
    assert "OHIF throws while loading it, in _getReferencedImagesList" in ran.stderr


def test_a_region_on_a_frame_the_library_does_not_list_fails(tmp_path: Path) -> None:
    built = detected(tmp_path)
    ds = pydicom.dcmread(built.report)
    [measurements] = [
        item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    group = measurements.ContentSequence[0]
    [region] = [item for item in group.ContentSequence if item.ValueType == "SCOORD"]
    region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber = 5
    ds.save_as(built.report)
    ran = read(built)
    assert ran.status == 1
    assert "the Image Library lists frame(s) 11,12,13" in ran.stderr


def test_a_region_on_an_image_not_given_is_skipped(tmp_path: Path) -> None:
    built = detected(tmp_path)
    ran = run_script("sr_read.mjs", built.report)  # no source images: no display set
    assert ran.status == 1
    assert "OHIF skips measurement" in ran.stderr
