"""The reading worklist in the database: one UPS workitem per study, its subscribers, its events.

Shared by the prioritize stage (which creates workitems and changes their priority) and the
UPS SCP (through which worklist clients query, claim and subscribe). A change that subscribers
must hear about is queued in the publication outbox (cadnode/deliver/outbox.py), in the same
commit as the change.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from copy import deepcopy
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pynetdicom import sop_class
from sqlalchemy import or_
from sqlmodel import Session, col, select

from cadnode.core.config import UpsTurnaround
from cadnode.core.db import (
    Database,
    Instance,
    Priority,
    PublicationChannel,
    Study,
    UpsState,
    UpsSubscription,
    Workitem,
    utcnow,
)
from cadnode.core.locks import ProcessLock, named_lock
from cadnode.deliver.outbox import queue_publication
from cadnode.dicom.matching import matches
from cadnode.encode.charset import utf8_header

FINAL_STATES = tuple(state for state in UpsState if state.final)

# N-EVENT-REPORT Event Type IDs (PS3.4 Table CC.2.4-1).
STATE_REPORT = 1
CANCEL_REQUESTED = 2

# The UPS SOP classes and the subscription instances (pynetdicom names them).
UPS_PUSH = sop_class.UnifiedProcedureStepPush  # type: ignore[attr-defined]
UPS_WATCH = sop_class.UnifiedProcedureStepWatch  # type: ignore[attr-defined]
UPS_PULL = sop_class.UnifiedProcedureStepPull  # type: ignore[attr-defined]
UPS_EVENT = sop_class.UnifiedProcedureStepEvent  # type: ignore[attr-defined]
UPS_QUERY = sop_class.UnifiedProcedureStepQuery  # type: ignore[attr-defined]
GLOBAL_SUBSCRIPTION = sop_class.UPSGlobalSubscriptionInstance
FILTERED_GLOBAL_SUBSCRIPTION = sop_class.UPSFilteredGlobalSubscriptionInstance


def lock(database: Database) -> ProcessLock:
    """Workitems are read, changed and written back by the prioritize stage and by UPS requests
    on association threads, perhaps in other receiver processes: one lock keeps those
    read-modify-writes from overwriting each other."""
    return named_lock(database, "worklist")


# The task: PS3.16 CID 9231 "Workitem Definition". Readers interpret the study; a worklist
# client filtering by task ((110005, DCM) "Interpretation") must find cadnode's workitems.
READING_TASK = codes.DCM.Interpretation

# Patient and admission attributes (UPS Relationship module): return key type 2, so always
# present, copied from the images, empty where they have none.
PATIENT_KEYWORDS = (
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
)
# Patient Medical module: return key type 2C, present only where the images carry them.
MEDICAL_KEYWORDS = ("MedicalAlerts", "PregnancyStatus", "SpecialNeeds")
# Of the request (Request Attributes Sequence of the images): type 2, always present.
ORDER_KEYWORDS = (
    "RequestedProcedureID",
    "OrderPlacerIdentifierSequence",
    "OrderFillerIdentifierSequence",
)
# Return key type 1C "required if set": left out rather than sent empty.
ORDER_NUMBER_KEYWORDS = (
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
)
# Scheduling the node has no value for (the reading station and reader are the site's
# choice): return key type 2, present and empty.
UNASSIGNED_SEQUENCES = (
    "ScheduledProcessingParametersSequence",
    "ScheduledStationNameCodeSequence",
    "ScheduledStationClassCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledHumanPerformersSequence",
)
DATETIME_FORMAT = "%Y%m%d%H%M%S"
# Every attribute `build_workitem` reads from the study's image (`workitem_source`).
SOURCE_KEYWORDS = (
    *PATIENT_KEYWORDS,
    *MEDICAL_KEYWORDS,
    "StudyInstanceUID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "RequestAttributesSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "Modality",
)


def workitem_uid(study_uid: str) -> str:
    """Derived from the study, so a study never gets two workitems."""
    return str(generate_uid(entropy_srcs=[study_uid, "reading workitem"]))


def workitem_source(path: Path) -> Dataset:
    """What the workitem (and the HL7 and webhook notices made from it) copies from the image
    at `path`: decoded whatever its character set, as the workitem is UTF-8. Only
    SOURCE_KEYWORDS are read: decoding the rest of the header would cost more than the
    workitem itself."""
    read = dcmread(path, stop_before_pixels=True, specific_tags=list(SOURCE_KEYWORDS))
    return utf8_header(read)


def build_workitem(
    uid: str,
    header: Dataset,
    instances: Iterable[Instance],
    *,
    priority: Priority,
    reason: str,
    worklist_label: str,
    turnaround: UpsTurnaround,
    retrieve_ae: str,
    ready: bool,
) -> Dataset:
    """A UPS for reading the study, SCHEDULED, at `priority`, with every attribute PS3.4
    Table CC.2.5-3 makes a type 1 or 2 return key (valued where the node knows it)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UPS_PUSH
    ds.SOPInstanceUID = uid
    _copy(ds, header, PATIENT_KEYWORDS)
    _copy(ds, header, [k for k in MEDICAL_KEYWORDS if _valued(header, k)])
    ds.ReferencedRequestSequence = [_request(header)]
    ds.StudyInstanceUID = header.StudyInstanceUID
    _schedule(ds, header, worklist_label)
    ds.CommentsOnTheScheduledProcedureStep = reason[:10240]
    reprioritize(ds, priority, turnaround)
    ds.InputReadinessState = "READY" if ready else "INCOMPLETE"
    ds.InputInformationSequence = input_information(
        str(header.StudyInstanceUID), instances, retrieve_ae
    )
    ds.ProcedureStepState = UpsState.SCHEDULED.value
    ds.ProcedureStepProgressInformationSequence = []
    ds.UnifiedProcedureStepPerformedProcedureSequence = []
    return ds


def _schedule(ds: Dataset, header: Dataset, worklist_label: str) -> None:
    """What is to be done, where and when: the Scheduled Procedure Information module."""
    ds.WorklistLabel = worklist_label
    ds.ProcedureStepLabel = _label(header)
    ds.ScheduledWorkitemCodeSequence = [_code_item(READING_TASK)]
    for keyword in UNASSIGNED_SEQUENCES:
        setattr(ds, keyword, [])
    ds.ScheduledProcedureStepStartDateTime = _now().strftime(DATETIME_FORMAT)


def reprioritize(ds: Dataset, priority: Priority, turnaround: UpsTurnaround) -> None:
    """Set the priority and what follows from it: the reading's expected completion (from the
    scheduled start), and the modification time the SCP keeps (PS3.4 Table CC.2.5-3)."""
    ds.ScheduledProcedureStepPriority = priority.value
    start = _parse_datetime(str(ds.get("ScheduledProcedureStepStartDateTime", "")))
    if start is not None:
        expected = start + turnaround.of(priority.value)
        ds.ExpectedCompletionDateTime = expected.strftime(DATETIME_FORMAT)
    touch(ds)


def touch(ds: Dataset) -> None:
    """Scheduled Procedure Step Modification DateTime: the time of the last change to it."""
    ds.ScheduledProcedureStepModificationDateTime = _now().strftime(DATETIME_FORMAT)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).astimezone()


def _parse_datetime(text: str) -> dt.datetime | None:
    """A DT value's date and time to the second (a client may N-SET one without them)."""
    try:
        return dt.datetime.strptime(text[:14], DATETIME_FORMAT)
    except ValueError:
        return None


def _request(header: Dataset) -> Dataset:
    """The order the study answers: its Request Attributes Sequence, and the study's own
    accession number and description where the images carry no request."""
    requested = (header.get("RequestAttributesSequence") or [Dataset()])[0]
    item = Dataset()
    item.StudyInstanceUID = header.StudyInstanceUID
    item.AccessionNumber = header.get("AccessionNumber") or requested.get("AccessionNumber", "")
    _copy(item, header, ["IssuerOfAccessionNumberSequence"])
    _copy(item, requested, ORDER_KEYWORDS)
    _copy(item, requested, [k for k in ORDER_NUMBER_KEYWORDS if _valued(requested, k)])
    item.RequestedProcedureDescription = requested.get("RequestedProcedureDescription") or (
        header.get("StudyDescription", "")
    )
    item.RequestedProcedureCodeSequence = deepcopy(
        requested.get("RequestedProcedureCodeSequence") or header.get("ProcedureCodeSequence", [])
    )
    return item


def _copy(target: Dataset, source: Dataset, keywords: Iterable[str]) -> None:
    """Each attribute as the source has it, or empty (zero length) where it has none."""
    for keyword in keywords:
        value = source.get(keyword)
        if value is not None:
            setattr(target, keyword, deepcopy(value))
        else:
            vr = dictionary_VR(keyword)
            target.add_new(keyword, vr, [] if vr == "SQ" else None)


def _valued(source: Dataset, keyword: str) -> bool:
    return keyword in source and not source[keyword].is_empty


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _label(header: Dataset) -> str:
    described = str(header.get("StudyDescription", "")).strip()
    return f"Read {described or header.get('Modality', 'study')}"[:64]


def input_information(
    study_uid: str, instances: Iterable[Instance], retrieve_ae: str
) -> list[Dataset]:
    by_series: dict[str, list[Instance]] = defaultdict(list)
    for instance in instances:
        by_series[instance.series_uid].append(instance)
    items = []
    for series_uid, members in sorted(by_series.items()):
        item = Dataset()
        item.StudyInstanceUID = study_uid
        item.SeriesInstanceUID = series_uid
        item.TypeOfInstances = "DICOM"
        retrieval = Dataset()
        retrieval.RetrieveAETitle = retrieve_ae
        item.DICOMRetrievalSequence = [retrieval]
        item.ReferencedSOPSequence = [_reference(i) for i in members]
        items.append(item)
    return items


def _reference(instance: Instance) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = instance.sop_class_uid
    item.ReferencedSOPInstanceUID = instance.sop_instance_uid
    return item


def dataset_of(item: Workitem) -> Dataset:
    return Dataset.from_json(item.dataset)


def keep(session: Session, item: Workitem, ds: Dataset) -> None:
    """Store the dataset, with the columns that mirror it kept in step."""
    item.dataset = ds.to_json_dict()
    item.priority = Priority(str(ds.ScheduledProcedureStepPriority))
    item.state = UpsState(str(ds.ProcedureStepState))
    item.updated_at = utcnow()
    session.add(item)


def workitem_of_study(session: Session, study_id: int) -> Workitem | None:
    return session.exec(select(Workitem).where(Workitem.study_id == study_id)).first()


def state_report(ds: Dataset) -> Dataset:
    """A UPS State Report's Event Information, with the priority added.

    The standard has no event for a priority change; PS3.4 CC.2.4.2 has SCUs accept every
    attribute in a notification, so the State Report carries (0074,1200) as well."""
    info = Dataset()
    info.ProcedureStepState = ds.ProcedureStepState
    info.InputReadinessState = ds.InputReadinessState
    info.ScheduledProcedureStepPriority = ds.ScheduledProcedureStepPriority
    if "ReasonForCancellation" in ds:
        info.ReasonForCancellation = ds.ReasonForCancellation
    return info


def subscribers(session: Session, item: Workitem) -> list[str]:
    """AE titles subscribed to this workitem, globally, or by a filter it matches."""
    rows = session.exec(
        select(UpsSubscription).where(
            or_(
                col(UpsSubscription.workitem_uid) == item.sop_instance_uid,
                col(UpsSubscription.workitem_uid) == GLOBAL_SUBSCRIPTION,
                col(UpsSubscription.workitem_uid) == FILTERED_GLOBAL_SUBSCRIPTION,
            )
        )
    ).all()
    chosen = {row.ae_title for row in rows if row.workitem_uid != FILTERED_GLOBAL_SUBSCRIPTION}
    filters = [row for row in rows if row.workitem_uid == FILTERED_GLOBAL_SUBSCRIPTION]
    if filters:  # the workitem is parsed (which costs) only to be matched
        ds = dataset_of(item)
        chosen |= {row.ae_title for row in filters if matches(ds, Dataset.from_json(row.filter))}
    return sorted(chosen)


def queue_event(
    session: Session,
    item: Workitem,
    event_type: int,
    info: Dataset,
    recipients: Iterable[str] | None = None,
    decision_id: int | None = None,
) -> None:
    """An N-EVENT-REPORT for each recipient (default: the workitem's subscribers)."""
    payload: dict[str, Any] = {
        "workitem": item.sop_instance_uid,
        "event_type": event_type,
        "info": info.to_json_dict(),
    }
    for ae_title in subscribers(session, item) if recipients is None else recipients:
        queue_publication(
            session,
            item.study_id,
            PublicationChannel.ups_event,
            ae_title,
            decision_id=decision_id,
            payload=payload,
        )


def study_of(session: Session, item: Workitem) -> Study:
    study = session.get(Study, item.study_id)
    assert study is not None
    return study
