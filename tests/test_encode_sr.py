"""The TID 1500 classification report: valid DICOM, and it says what the engine answered."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from cadnode.encode.sr import (
    Algorithm,
    Classification,
    CodedLabel,
    ReportIdentity,
    classification_report,
)
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom, write_chest_radiograph
from tests.dicom_validation import assert_valid, dciodvfy_errors, saved

ALGORITHM = Algorithm(name="cxr-ruleout", version="0.1.0", sha256="0123456789abcdef" * 4)
ABNORMAL = CodedLabel(value="263654008", scheme="SCT", meaning="Abnormal")
SERIES_UID = generate_uid(entropy_srcs=["test-encode-sr", "series"])
SOP_UID = generate_uid(entropy_srcs=["test-encode-sr", "instance"])
WHEN = dt.datetime(2026, 1, 2, 9, 30, 0)


@pytest.fixture
def film(tmp_path: Path) -> pydicom.Dataset:
    """A chest film as the node receives it: written to disk, read back."""
    path = tmp_path / "film.dcm"
    write_chest_radiograph(
        path, seed=11, opacity=True, patient_id="PID-11", patient_name="Doe^Jane"
    )
    return pydicom.dcmread(path)


@pytest.fixture
def second_film(film: pydicom.Dataset) -> pydicom.Dataset:
    """Another view in the same study, header only (no pixel data)."""
    ds = chest_dataset(
        make_chest_phantom(12),
        patient_id="PID-11",
        patient_name="Doe^Jane",
        study_uid=film.StudyInstanceUID,
        seed=12,
        view="AP",
    )
    del ds.PixelData
    return ds


def answer(source: pydicom.Dataset, probability: float, threshold: float = 0.12) -> Classification:
    return Classification(
        source=source,
        label=ABNORMAL,
        probability=probability,
        operating_point="rule_out",
        threshold=threshold,
        ruled_out=probability < threshold,
    )


def build(*classifications: Classification) -> hd.sr.Comprehensive3DSR:
    return classification_report(
        list(classifications),
        ALGORITHM,
        ReportIdentity(SERIES_UID, SOP_UID, content_datetime=WHEN),
    )


def texts(item: pydicom.Dataset, code: Code) -> list[str]:
    """Values of the TEXT items named `code` directly below a content item."""
    return [
        str(found.TextValue)
        for found in hd.sr.utils.find_content_items(
            item, name=code, value_type=hd.sr.ValueTypeValues.TEXT, recursive=False
        )
    ]


# --- dciodvfy -----------------------------------------------------------------------------


@pytest.mark.parametrize("probability", [0.87, 0.03], ids=["abnormal", "ruled-out"])
def test_report_passes_dciodvfy(film: pydicom.Dataset, tmp_path: Path, probability: float) -> None:
    path = saved(build(answer(film, probability)), tmp_path / "sr.dcm")
    assert_valid(path)


def test_two_films_of_one_study_pass_dciodvfy(
    film: pydicom.Dataset, second_film: pydicom.Dataset, tmp_path: Path
) -> None:
    sr = build(answer(film, 0.87), answer(second_film, 0.03))
    path = saved(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    evidence = {uid[2] for uid in hd.sr.srread(path).get_evidence()}
    assert evidence == {film.SOPInstanceUID, second_film.SOPInstanceUID}


def test_dciodvfy_helper_reports_errors(film: pydicom.Dataset, tmp_path: Path) -> None:
    sr = build(answer(film, 0.87))
    del sr.CompletionFlag  # type 1 in the SR Document General module
    path = saved(sr, tmp_path / "broken.dcm")
    assert any("CompletionFlag" in line for line in dciodvfy_errors(path))


# --- content, read back -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probability", "finding"),
    [(0.87, codes.SCT.Abnormal), (0.03, codes.SCT.Normal)],
    ids=["abnormal", "ruled-out"],
)
def test_report_reads_back(
    film: pydicom.Dataset, tmp_path: Path, probability: float, finding: Code
) -> None:
    path = saved(build(answer(film, probability)), tmp_path / "sr.dcm")
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)

    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.finding_type == finding
    [source] = group.source_images
    assert source.referenced_sop_instance_uid == film.SOPInstanceUID
    assert source.referenced_sop_class_uid == film.SOPClassUID
    assert group.tracking_uid is not None

    [measurement] = group.get_measurements(name=codes.DCM.Probability)
    assert measurement.value == probability
    assert measurement.unit == codes.UCUM.NoUnits

    # The decision's algorithm (on the group): name, version, model hash, operating point.
    group_item = group[0]
    assert texts(group_item, codes.DCM.AlgorithmName) == [ALGORITHM.name]
    assert texts(group_item, codes.DCM.AlgorithmVersion) == [ALGORITHM.version]
    assert texts(group_item, codes.DCM.AlgorithmParameters) == [
        f"sha256={ALGORITHM.sha256}",
        "operating_point=rule_out",
        "threshold=0.12",
    ]
    # The probability's algorithm: the same model, no threshold.
    num_item = measurement[0]
    assert texts(num_item, codes.DCM.AlgorithmName) == [ALGORITHM.name]
    assert texts(num_item, codes.DCM.AlgorithmVersion) == [ALGORITHM.version]
    assert texts(num_item, codes.DCM.AlgorithmParameters) == [f"sha256={ALGORITHM.sha256}"]

    observers = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    [device] = observers
    attributes = device.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.name == "cadnode cxr-ruleout"
    assert attributes.manufacturer_name == "cadnode"


def test_report_joins_the_patient_and_study(film: pydicom.Dataset, tmp_path: Path) -> None:
    sr = pydicom.dcmread(saved(build(answer(film, 0.87)), tmp_path / "sr.dcm"))
    assert sr.PatientID == film.PatientID == "PID-11"
    assert sr.PatientName == film.PatientName
    assert sr.StudyInstanceUID == film.StudyInstanceUID
    assert sr.AccessionNumber == film.AccessionNumber
    assert sr.SeriesInstanceUID == SERIES_UID
    assert sr.SOPInstanceUID == SOP_UID
    assert sr.SeriesInstanceUID != film.SeriesInstanceUID
    assert sr.Modality == "SR"
    assert sr.Manufacturer == "cadnode"
    assert sr.SeriesDescription == "cadnode cxr-ruleout results"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert (sr.ContentDate, sr.ContentTime) == ("20260102", "093000")
    [procedure] = hd.sr.utils.find_content_items(
        hd.sr.srread(tmp_path / "sr.dcm").content[0], name=codes.DCM.ProcedureReported
    )
    assert procedure.value == hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")


def test_same_inputs_same_bytes(
    film: pydicom.Dataset, second_film: pydicom.Dataset, tmp_path: Path
) -> None:
    first = saved(build(answer(film, 0.87), answer(second_film, 0.03)), tmp_path / "1.dcm")
    again = saved(build(answer(film, 0.87), answer(second_film, 0.03)), tmp_path / "2.dcm")
    assert first.read_bytes() == again.read_bytes()
    sr = pydicom.dcmread(first)
    assert (sr.InstanceCreationDate, sr.InstanceCreationTime) == ("20260102", "093000")


def test_without_a_time_only_the_clock_differs(film: pydicom.Dataset) -> None:
    def content(sr: hd.sr.Comprehensive3DSR) -> dict[str, object]:
        for keyword in (
            "InstanceCreationDate",
            "InstanceCreationTime",
            "ContentDate",
            "ContentTime",
            "SeriesDate",
            "SeriesTime",
        ):
            delattr(sr, keyword)
        for equipment in sr.ContributingEquipmentSequence:
            if "ContributionDateTime" in equipment:
                del equipment.ContributionDateTime
        return sr.to_json_dict()

    def unstamped() -> hd.sr.Comprehensive3DSR:
        return classification_report(
            [answer(film, 0.87)],
            ALGORITHM,
            ReportIdentity(SERIES_UID, SOP_UID),
        )

    assert content(unstamped()) == content(unstamped())


def test_source_may_lack_pixel_data_and_type2_attributes(
    film: pydicom.Dataset, tmp_path: Path
) -> None:
    header = pydicom.Dataset(film)
    del header.PixelData
    del header.PatientBirthDate, header.ReferringPhysicianName
    sr = build(answer(header, 0.5))
    assert "PatientBirthDate" not in header  # the caller's dataset is left alone
    assert dciodvfy_errors(saved(sr, tmp_path / "sr.dcm")) == []


# --- refusals -----------------------------------------------------------------------------


def test_refuses_a_contradictory_decision(film: pydicom.Dataset) -> None:
    with pytest.raises(ValueError, match="contradicts"):
        build(replace(answer(film, 0.87), ruled_out=True))


@pytest.mark.parametrize("probability", [-0.1, 1.5, float("nan")])
def test_refuses_a_probability_outside_0_1(film: pydicom.Dataset, probability: float) -> None:
    with pytest.raises(ValueError, match="probability"):
        build(replace(answer(film, 0.5), probability=probability))


def test_refuses_films_of_two_studies(film: pydicom.Dataset) -> None:
    other = chest_dataset(
        make_chest_phantom(13), patient_id="PID-11", patient_name="Doe^Jane", seed=13
    )
    with pytest.raises(ValueError, match="studies"):
        build(answer(film, 0.87), answer(other, 0.03))


def test_refuses_nothing_and_duplicates(film: pydicom.Dataset) -> None:
    with pytest.raises(ValueError, match="at least one"):
        build()
    with pytest.raises(ValueError, match="more than once"):
        build(answer(film, 0.87), answer(film, 0.03))
