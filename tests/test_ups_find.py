"""UPS C-FIND as a worklist client uses it: a pynetdicom UPS SCU on a real association to
cadnode's UPS SCP, filtering by task (PS3.16 CID 9231) and asking for every return key
PS3.4 Table CC.2.5-3 requires."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import pytest
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pynetdicom import AE

from cadnode.core.config import UpsTurnaround
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.prioritize.worklist import DATETIME_FORMAT, UPS_PULL, UPS_PUSH
from tests.peers import Cadnode, free_port, run_cadnode, storescu, wait_for
from tests.worklist_peers import WorklistClient, priority_config, study_query

INTERPRETATION = ("110005", "DCM", "Interpretation")
TRANSCRIPTION = ("110006", "DCM", "Transcription")

# Table CC.2.5-3 return keys of type 1 (valued), 1C whose condition holds for a reading
# workitem, and type 2 (present, perhaps empty), with those of the sequences' items.
TYPE_1 = (
    "SpecificCharacterSet",  # 1C: the workitem is UTF-8
    "SOPClassUID",
    "SOPInstanceUID",
    "ScheduledProcedureStepPriority",
    "ProcedureStepLabel",
    "WorklistLabel",
    "ScheduledProcedureStepStartDateTime",
    "InputReadinessState",
    "ProcedureStepState",
)
TYPE_2 = (
    "ScheduledProcessingParametersSequence",
    "ScheduledStationNameCodeSequence",
    "ScheduledStationClassCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledHumanPerformersSequence",
    "ScheduledWorkitemCodeSequence",
    "InputInformationSequence",
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "ReferencedRequestSequence",
    "ProcedureStepProgressInformationSequence",
)
# Type 2 keys the node always knows for a study it holds.
VALUED_TYPE_2 = (
    "ScheduledWorkitemCodeSequence",
    "InputInformationSequence",
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "ReferencedRequestSequence",
)
# Type 3 keys cadnode values all the same: when it was changed, when it should be read, why.
VALUED_TYPE_3 = (
    "ScheduledProcedureStepModificationDateTime",
    "ExpectedCompletionDateTime",
    "CommentsOnTheScheduledProcedureStep",
)
CODE_TYPE_1 = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
REQUEST_TYPE_1 = ("StudyInstanceUID",)
REQUEST_TYPE_2 = (
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "OrderPlacerIdentifierSequence",
    "OrderFillerIdentifierSequence",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence",
)
INPUT_TYPE_1 = (
    "TypeOfInstances",
    "StudyInstanceUID",  # 1C: DICOM instances of a model with a study
    "SeriesInstanceUID",  # 1C: and with a series
    "ReferencedSOPSequence",
    "DICOMRetrievalSequence",  # 1C: the only way cadnode offers them
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cadnode]:
    folder = tmp_path_factory.mktemp("ups-find")
    config = priority_config(folder, watcher=WorklistClient(), hl7_port=free_port())
    settings = json.loads(config.read_text())
    settings["priority"]["hl7"] = {}  # no RIS: only the worklist is under test
    config.write_text(json.dumps(settings))
    with run_cadnode(folder, None, CADNODE_CONFIG=str(config)) as cadnode:
        yield cadnode


@pytest.fixture(scope="module")
def client() -> WorklistClient:
    return WorklistClient(ae_title="READER")


@pytest.fixture(scope="module")
def film(
    node: Cadnode, client: WorklistClient, tmp_path_factory: pytest.TempPathFactory
) -> Dataset:
    """A chest film sent to cadnode, once its workitem is on the worklist."""
    path = tmp_path_factory.mktemp("films") / "film.dcm"
    pushed = write_chest_radiograph(path, seed=811, size=256)
    done = storescu(node.dicom_port, path)
    assert done.returncode == 0, done.stderr
    wait_for(
        lambda: client.find(node.dicom_port, study_query(pushed.StudyInstanceUID)),
        30,
        "the workitem on the worklist",
    )
    return pushed


def task_query(code: tuple[str, str, str], study_uid: str | None = None) -> Dataset:
    """Workitems for one task, by code value and scheme (the meaning is not a matching key,
    so it is sent valued as a client reading it from its own code list would)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    query = Dataset()
    query.SOPInstanceUID = ""
    query.ScheduledWorkitemCodeSequence = [item]
    if study_uid:
        request = Dataset()
        request.StudyInstanceUID = study_uid
        query.ReferencedRequestSequence = [request]
    return query


def every_return_key(study_uid: str) -> Dataset:
    query = Dataset()
    for keyword in (*TYPE_1, *TYPE_2, *VALUED_TYPE_3):
        query.add_new(
            keyword, dictionary_VR(keyword), [] if dictionary_VR(keyword) == "SQ" else None
        )
    query.SpecificCharacterSet = "ISO_IR 192"
    request = Dataset()
    request.StudyInstanceUID = study_uid
    for keyword in REQUEST_TYPE_2:
        vr = dictionary_VR(keyword)
        request.add_new(keyword, vr, [] if vr == "SQ" else None)
    query.ReferencedRequestSequence = [request]
    return query


def codes_of(found: Dataset) -> list[tuple[str, str, str]]:
    return [
        (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)
        for item in found.ScheduledWorkitemCodeSequence
    ]


def test_a_client_filtering_on_the_reading_task_finds_the_workitems(
    node: Cadnode, client: WorklistClient, film: Dataset
) -> None:
    [mine] = client.find(node.dicom_port, task_query(INTERPRETATION, film.StudyInstanceUID))
    assert codes_of(mine) == [INTERPRETATION]
    every = client.find(node.dicom_port, task_query(INTERPRETATION))  # the whole task list
    assert mine.SOPInstanceUID in {found.SOPInstanceUID for found in every}
    assert all(codes_of(found) == [INTERPRETATION] for found in every)
    worded_otherwise = task_query(("110005", "DCM", "Reading"), film.StudyInstanceUID)
    assert len(client.find(node.dicom_port, worded_otherwise)) == 1


@pytest.mark.parametrize(
    "code",
    [TRANSCRIPTION, ("110005", "SCT", "Interpretation")],
    ids=["another-task", "same-value-other-scheme"],
)
def test_a_client_filtering_on_another_task_finds_none(
    node: Cadnode, client: WorklistClient, film: Dataset, code: tuple[str, str, str]
) -> None:
    assert client.find(node.dicom_port, task_query(code, film.StudyInstanceUID)) == []
    assert client.find(node.dicom_port, task_query(code)) == []


def test_every_required_return_key_is_returned(
    node: Cadnode, client: WorklistClient, film: Dataset
) -> None:
    [found] = client.find(node.dicom_port, every_return_key(film.StudyInstanceUID))
    missing = [k for k in (*TYPE_1, *TYPE_2, *VALUED_TYPE_3) if k not in found]
    assert missing == []
    empty = [k for k in (*TYPE_1, *VALUED_TYPE_2, *VALUED_TYPE_3) if found[k].is_empty]
    assert empty == []
    assert found.SOPClassUID == "1.2.840.10008.5.1.4.34.6.1"  # UPS Push, for every UPS
    assert found.ProcedureStepState == "SCHEDULED"
    assert found.ExpectedCompletionDateTime > found.ScheduledProcedureStepStartDateTime
    assert (found.PatientID, found.PatientName) == (film.PatientID, film.PatientName)
    [code] = found.ScheduledWorkitemCodeSequence
    assert all(code.get(k) for k in CODE_TYPE_1)
    [request] = found.ReferencedRequestSequence
    assert all(request.get(k) for k in REQUEST_TYPE_1) and all(k in request for k in REQUEST_TYPE_2)
    assert request.AccessionNumber == film.AccessionNumber
    [series] = found.InputInformationSequence
    assert all(series.get(k) for k in INPUT_TYPE_1)
    assert series.TypeOfInstances == "DICOM" and series.DICOMRetrievalSequence[0].RetrieveAETitle
    [instance] = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == film.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == film.SOPClassUID


def test_a_priority_set_by_a_client_moves_the_expected_completion(
    node: Cadnode, client: WorklistClient, film: Dataset
) -> None:
    def decided_on_results() -> bool:  # else the policy's decision could follow the N-SET
        row = next(r for r in node.studies() if r["study_uid"] == film.StudyInstanceUID)
        return any(h["rule"] != "arrival" for h in row["priority_history"])

    wait_for(decided_on_results, 60, "the policy's decision on the results", interval_s=0.2)
    [before] = client.find(node.dicom_port, every_return_key(film.StudyInstanceUID))
    changes = Dataset()
    changes.ScheduledProcedureStepPriority = "HIGH"
    ae = AE(ae_title="READER")
    ae.add_requested_context(UPS_PULL)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="CADNODE")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_set(changes, UPS_PUSH, before.SOPInstanceUID, meta_uid=UPS_PULL)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    [after] = client.find(node.dicom_port, every_return_key(film.StudyInstanceUID))
    start = dt.datetime.strptime(after.ScheduledProcedureStepStartDateTime, DATETIME_FORMAT)
    expected = dt.datetime.strptime(after.ExpectedCompletionDateTime, DATETIME_FORMAT)
    assert after.ScheduledProcedureStepPriority == "HIGH"
    assert expected - start == UpsTurnaround().of("HIGH")  # the default
    assert (
        after.ScheduledProcedureStepModificationDateTime
        >= before.ScheduledProcedureStepModificationDateTime
    )
