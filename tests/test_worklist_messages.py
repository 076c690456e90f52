"""What the worklist publishes, built from a real workitem: C-FIND matching and responses on
UPS datasets, and HL7 order updates parsed back with hl7apy."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom import Dataset, dcmread

from cadnode.core.config import Hl7Codes, Hl7Publisher, UpsTurnaround
from cadnode.core.db import Instance, Priority
from cadnode.dicom.matching import matches, response
from cadnode.encode.charset import utf8_header
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.prioritize.hl7 import order_update
from cadnode.prioritize.notice import Notice
from cadnode.prioritize.worklist import (
    build_workitem,
    reprioritize,
    workitem_source,
    workitem_uid,
)
from tests.worklist_peers import study_query

# Not the defaults: the turnaround comes from the configuration.
TURNAROUND = UpsTurnaround(HIGH=1800.0, MEDIUM=7200.0, LOW=86400.0)


@pytest.fixture
def workitem(tmp_path: Path) -> Dataset:
    film = write_chest_radiograph(
        tmp_path / "film.dcm", seed=3, patient_name="O'Neil^Ann^B^Dr", patient_id="PID|7"
    )
    film.StudyDescription = "Chest & lungs ^ PA"
    instance = Instance(
        sop_instance_uid=film.SOPInstanceUID,
        sop_class_uid=film.SOPClassUID,
        series_uid=film.SeriesInstanceUID,
        transfer_syntax="1.2.840.10008.1.2.1",
        path="film.dcm",
        size=1,
        calling_ae="MODALITY",
        peer="127.0.0.1:1",
        job_id=1,
    )
    return build_workitem(
        workitem_uid(film.StudyInstanceUID),
        film,
        [instance],
        priority=Priority.HIGH,
        reason="pneumothorax detected",
        worklist_label="CADNODE",
        turnaround=TURNAROUND,
        retrieve_ae="CADNODE",
        ready=True,
    )


def test_c_find_matches_the_study_inside_referenced_request_sequence(workitem: Dataset) -> None:
    study_uid = workitem.StudyInstanceUID
    assert matches(workitem, study_query(study_uid))
    assert not matches(workitem, study_query("1.2.3.4"))
    answer = response(workitem, study_query(study_uid))
    assert answer.ScheduledProcedureStepPriority == "HIGH"
    assert answer.SOPInstanceUID == workitem.SOPInstanceUID
    assert answer.ReferencedRequestSequence[0].AccessionNumber == "ACC00000003"
    assert "PatientName" not in answer  # only what was asked for
    [series] = answer.InputInformationSequence  # an empty sequence key returns it whole
    assert series == workitem.InputInformationSequence[0]
    assert len(series.ReferencedSOPSequence) == 1


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("ScheduledProcedureStepPriority", "HIGH", True),
        ("ScheduledProcedureStepPriority", "LOW", False),
        ("PatientName", "o'neil*", True),  # PN: case-insensitive wildcard
        ("PatientName", "Smith*", False),
        ("ProcedureStepState", "SCHEDULED", True),
        ("ScheduledProcedureStepStartDateTime", "19000101-", True),
        ("ScheduledProcedureStepStartDateTime", "-19000101", False),
        ("WorklistLabel", "CAD?ODE", True),
    ],
)
def test_c_find_matching_kinds(workitem: Dataset, keyword: str, value: str, expected: bool) -> None:
    query = Dataset()
    setattr(query, keyword, value)
    assert matches(workitem, query) is expected


def test_c_find_matches_a_list_of_uids(workitem: Dataset) -> None:
    query = Dataset()
    query.SOPInstanceUID = ["1.2.3", workitem.SOPInstanceUID]
    assert matches(workitem, query)
    query.SOPInstanceUID = ["1.2.3", "1.2.4"]
    assert not matches(workitem, query)


def code_query(value: str, scheme: str, meaning: str = "") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    query = Dataset()
    query.ScheduledWorkitemCodeSequence = [item]
    return query


def test_the_workitem_is_a_reading_task_from_cid_9231(workitem: Dataset) -> None:
    [task] = workitem.ScheduledWorkitemCodeSequence
    assert (task.CodeValue, task.CodingSchemeDesignator, task.CodeMeaning) == (
        "110005",
        "DCM",
        "Interpretation",
    )


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (("110005", "DCM"), True),
        (("110005", "DCM", "Interpretation"), True),
        (("110005", "DCM", "Befundung"), True),  # a meaning is text, never matched
        (("1100*", "DCM"), True),
        (("110006", "DCM", "Interpretation"), False),
        (("110005", "SCT"), False),
        (("", "", "Transcription"), True),  # nothing but a meaning: it asks, it does not filter
    ],
)
def test_c_find_matches_a_coded_item_by_code_value_and_scheme(
    workitem: Dataset, code: tuple[str, ...], expected: bool
) -> None:
    assert matches(workitem, code_query(*code)) is expected


def test_the_expected_completion_follows_the_priority(workitem: Dataset) -> None:
    start = dt.datetime.strptime(workitem.ScheduledProcedureStepStartDateTime, "%Y%m%d%H%M%S")

    def expected() -> dt.timedelta:
        end = dt.datetime.strptime(workitem.ExpectedCompletionDateTime, "%Y%m%d%H%M%S")
        return end - start

    assert expected() == TURNAROUND.of("HIGH")
    reprioritize(workitem, Priority.LOW, TURNAROUND)
    assert workitem.ScheduledProcedureStepPriority == "LOW"
    assert expected() == TURNAROUND.of("LOW") > TURNAROUND.of("MEDIUM")
    assert workitem.ScheduledProcedureStepModificationDateTime >= start.strftime("%Y%m%d%H%M%S")


def test_the_request_comes_from_the_images_request_attributes(tmp_path: Path) -> None:
    film = write_chest_radiograph(tmp_path / "film.dcm", seed=4)
    request = Dataset()
    request.RequestedProcedureID = "RP-9"
    request.RequestedProcedureDescription = "Chest PA"
    request.PlacerOrderNumberImagingServiceRequest = "PLACER-1"
    film.RequestAttributesSequence = [request]
    film.IssuerOfPatientID = "HOSPITAL"
    film.PregnancyStatus = 4  # unknown
    ds = build_workitem(
        workitem_uid(film.StudyInstanceUID),
        film,
        [],
        priority=Priority.MEDIUM,
        reason="arrived",
        worklist_label="CADNODE",
        turnaround=TURNAROUND,
        retrieve_ae="CADNODE",
        ready=False,
    )
    [item] = ds.ReferencedRequestSequence
    assert (item.RequestedProcedureID, item.RequestedProcedureDescription) == ("RP-9", "Chest PA")
    assert item.PlacerOrderNumberImagingServiceRequest == "PLACER-1"
    assert "FillerOrderNumberImagingServiceRequest" not in item  # 1C: only when set
    assert item.OrderFillerIdentifierSequence == []  # type 2: present, empty
    assert (ds.IssuerOfPatientID, ds.PregnancyStatus) == ("HOSPITAL", 4)
    assert "MedicalAlerts" not in ds  # 2C: only when the images have it
    assert ds["AdmissionID"].is_empty and ds.ScheduledHumanPerformersSequence == []


def notice(workitem: Dataset) -> Notice:
    return Notice(
        publication_id=42,
        study_uid=workitem.StudyInstanceUID,
        workitem=workitem,
        level=Priority.HIGH,
        previous=Priority.MEDIUM,
        reason="pneumothorax | above 10 %",
    )


def test_omi_carries_priority_in_tq1_and_obr_with_accession_and_study(workitem: Dataset) -> None:
    publisher = Hl7Publisher(host="ris", port=2575, codes=Hl7Codes(HIGH="A"))
    text = order_update(notice(workitem), publisher, "CADNODE42").to_er7()
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    assert message.msh.msh_9.to_er7() == "OMI^O23^OMI_O23"
    assert message.msh.msh_10.to_er7() == "CADNODE42"
    order = message.omi_o23_order
    assert order.omi_o23_timing.tq1.tq1_9.to_er7() == "A"
    assert order.obr.obr_5.to_er7() == "A"
    assert order.orc.orc_3.to_er7() == "ACC00000003"
    assert order.ipc.ipc_1.to_er7() == "ACC00000003"
    assert order.ipc.ipc_3.to_er7() == workitem.StudyInstanceUID
    patient = message.omi_o23_patient.pid
    assert patient.pid_3.cx_1.to_er7() == "PID\\F\\7"  # the delimiter escaped, not split on
    assert patient.pid_5.xpn_1.to_er7() == "O'Neil" and patient.pid_5.xpn_5.to_er7() == "Dr"
    assert "Chest \\T\\ lungs \\S\\ PA" in text and "pneumothorax \\F\\ above" in text


def test_orm_carries_priority_in_orc_7_and_obr_5_and_the_study_in_zds(workitem: Dataset) -> None:
    publisher = Hl7Publisher(host="ris", port=2575, message="ORM^O01")
    text = order_update(notice(workitem), publisher, "CADNODE42").to_er7()
    segments = {s.name: s for s in parse_message(text, find_groups=False).children}
    assert segments["MSH"].msh_9.to_er7() == "ORM^O01"
    assert segments["ORC"].orc_7.to_er7() == "^^^^^S"
    assert segments["OBR"].obr_5.to_er7() == "S"
    assert segments["OBR"].obr_18.to_er7() == "ACC00000003"
    assert segments["ZDS"].zds_1.to_er7() == f"{workitem.StudyInstanceUID}^100^Application^DICOM"


def test_reading_only_the_source_keywords_makes_the_same_workitem(tmp_path: Path) -> None:
    """The stage reads only SOURCE_KEYWORDS from the image: the workitem is what the whole
    header makes, for an image carrying every attribute the workitem copies."""
    path = tmp_path / "film.dcm"
    film = write_chest_radiograph(path, seed=5, patient_name="Buc^Jérôme")
    film.SpecificCharacterSet = "ISO_IR 100"
    film.StudyDescription = "Thorax à l'entrée"
    film.IssuerOfPatientID = "HOSPITAL"
    film.OtherPatientIDsSequence = [Dataset()]
    film.OtherPatientIDsSequence[0].PatientID = "OTHER-5"
    film.AdmissionID = "ADM-5"
    film.MedicalAlerts = "Latex"
    film.PregnancyStatus = 4
    film.IssuerOfAccessionNumberSequence = [Dataset()]
    film.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID = "RIS"
    request = Dataset()
    request.RequestedProcedureID = "RP-5"
    request.FillerOrderNumberImagingServiceRequest = "FILLER-5"
    request.RequestedProcedureCodeSequence = [Dataset()]
    request.RequestedProcedureCodeSequence[0].CodeValue = "RPID5"
    request.RequestedProcedureCodeSequence[0].CodingSchemeDesignator = "99RIS"
    request.RequestedProcedureCodeSequence[0].CodeMeaning = "Chest PA"
    film.RequestAttributesSequence = [request]
    film.save_as(path, enforce_file_format=True)

    def workitem_of(header: Dataset) -> dict[str, object]:
        ds = build_workitem(
            workitem_uid(film.StudyInstanceUID),
            header,
            [],
            priority=Priority.MEDIUM,
            reason="arrived",
            worklist_label="CADNODE",
            turnaround=TURNAROUND,
            retrieve_ae="CADNODE",
            ready=False,
        )
        for clock in (  # now, to the second: may differ between the two builds
            "ScheduledProcedureStepStartDateTime",
            "ExpectedCompletionDateTime",
            "ScheduledProcedureStepModificationDateTime",
        ):
            del ds[clock]
        return ds.to_json_dict()

    whole = workitem_of(utf8_header(dcmread(path, stop_before_pixels=True)))
    assert whole == workitem_of(workitem_source(path))
    assert "Jérôme" in str(whole) and "RP-5" in str(whole) and "Latex" in str(whole)
