"""The SR document built around the content tree (cadnode/encode/sr/document.py) is, byte for
byte, what highdicom's own constructor makes from the whole tree: for every kind of report.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import cadnode.encode.sr.sop as sop
from cadnode.encode.provenance import source_header
from cadnode.encode.sr import (
    Algorithm,
    Classification,
    CodedLabel,
    Detection,
    ReportIdentity,
    detection_report,
)
from cadnode.encode.sr.document import ReportDocument, report_document
from tests.encode_cases import (
    DETECTOR,
    detect_answer,
    film_with_masks,
    segmented_film,
    volume,
)

WHEN = dt.datetime(2026, 1, 2, 9, 30, 0, 250000)
RULEOUT = Algorithm(name="cxr-ruleout", version="0.1.0", sha256="ef" * 32)
ABNORMAL = CodedLabel(value="263654008", scheme="SCT", meaning="Abnormal")


def uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["test-sr-document", *parts])


def identity(name: str) -> ReportIdentity:
    return ReportIdentity(uid(name, "series"), uid(name), 901, content_datetime=WHEN)


def classified(folder: Path) -> pydicom.Dataset:
    """Two films of one study, one ruled out."""
    film, _ = film_with_masks(folder, pneumothorax=False)
    second, _ = film_with_masks(folder, pneumothorax=True, seed=4, study_uid=film.StudyInstanceUID)
    return sop.classification_report(
        [
            Classification(film, ABNORMAL, 0.1, "rule_out", 0.47, ruled_out=True),
            Classification(second, ABNORMAL, 0.8, "rule_out", 0.47, ruled_out=False),
        ],
        RULEOUT,
        identity("classified"),
    )


def segmented(folder: Path) -> pydicom.Dataset:
    """The segmenter's report, its SEG as evidence beside the film."""
    return segmented_film(folder, pneumothorax=True, uid=uid, when=WHEN)[2]


def detected(folder: Path) -> pydicom.Dataset:
    """A volume with masses (regions on frames), another without (an "absent" group)."""
    with_masses, boxes = volume(folder, masses=2, seed=6)
    without, _ = volume(folder, masses=0, seed=7)
    without.StudyInstanceUID = with_masses.StudyInstanceUID
    without.PatientID = with_masses.PatientID
    return detection_report(
        [
            Detection(with_masses, detect_answer(with_masses, boxes)),
            Detection(without, detect_answer(without, [])),
        ],
        DETECTOR,
        identity("detected"),
    )


def written(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def highdicom_whole(
    evidence: list[pydicom.Dataset], root: pydicom.Dataset, **attributes: Any
) -> hd.sr.Comprehensive3DSR:
    """What the reports were built with before: highdicom given the whole tree."""
    return hd.sr.Comprehensive3DSR(evidence=evidence, content=root, **attributes)


@pytest.mark.parametrize("build", [classified, segmented, detected])
def test_the_same_bytes_as_highdicom_builds_from_the_whole_tree(
    build: Callable[[Path], pydicom.Dataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = build(tmp_path / "attached")
    assert isinstance(report, ReportDocument)
    monkeypatch.setattr(sop, "report_document", highdicom_whole)
    reference = build(tmp_path / "copied")
    assert not isinstance(reference, ReportDocument)
    assert written(report) == written(reference)


def test_its_content_is_the_tree(tmp_path: Path) -> None:
    report = segmented(tmp_path)
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport)
    groups = content.get_planar_roi_measurement_groups()
    findings = [group.finding_type for group in groups]
    assert [f.meaning if f else None for f in findings] == [
        "Right lung",
        "Left lung",
        "Pneumothorax",
    ]


def test_a_reference_without_evidence_is_refused(tmp_path: Path) -> None:
    """An image referenced deep in the tree but not given as evidence (as highdicom refuses)."""
    film, _ = film_with_masks(tmp_path, pneumothorax=False)
    missing = uid("not evidence")
    image = hd.sr.ImageContentItem(
        name=codes.DCM.SourceOfMeasurement,
        referenced_sop_class_uid=str(film.SOPClassUID),
        referenced_sop_instance_uid=missing,
        relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
    )
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.MeasurementGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence([image])
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence([group])
    with pytest.raises(ValueError, match=missing):
        report_document(
            [source_header(film)],
            root,
            series_instance_uid=uid("refused", "series"),
            series_number=1,
            sop_instance_uid=uid("refused"),
            instance_number=1,
            manufacturer="cadnode",
        )
