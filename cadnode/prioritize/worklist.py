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
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import sop_class
from sqlalchemy import or_
from sqlmodel import Session, col, select

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


# Study-level attributes a workitem copies from the images, and the request they belong to.
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")


def workitem_uid(study_uid: str) -> str:
    """Derived from the study, so a study never gets two workitems."""
    return str(generate_uid(entropy_srcs=[study_uid, "reading workitem"]))


def build_workitem(
    uid: str,
    header: Dataset,
    instances: Iterable[Instance],
    *,
    priority: Priority,
    reason: str,
    worklist_label: str,
    retrieve_ae: str,
    ready: bool,
) -> Dataset:
    """A UPS for reading the study (PS3.4 Table CC.2.5-3): SCHEDULED, at `priority`."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UPS_PUSH
    ds.SOPInstanceUID = uid
    for keyword in PATIENT_KEYWORDS:
        setattr(ds, keyword, header.get(keyword, ""))
    ds.AdmissionID = ""
    ds.IssuerOfAdmissionIDSequence = []
    ds.ReferencedRequestSequence = [_request(header)]
    ds.StudyInstanceUID = header.StudyInstanceUID
    ds.ScheduledProcedureStepPriority = priority.value
    ds.CommentsOnTheScheduledProcedureStep = reason[:10240]
    ds.WorklistLabel = worklist_label
    ds.ProcedureStepLabel = _label(header)
    now = dt.datetime.now(dt.UTC).astimezone()
    ds.ScheduledProcedureStepStartDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.ScheduledProcedureStepModificationDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.ScheduledWorkitemCodeSequence = []
    ds.ScheduledStationNameCodeSequence = []
    ds.ScheduledStationClassCodeSequence = []
    ds.ScheduledStationGeographicLocationCodeSequence = []
    ds.InputReadinessState = "READY" if ready else "INCOMPLETE"
    ds.InputInformationSequence = input_information(header, instances, retrieve_ae)
    ds.ProcedureStepState = UpsState.SCHEDULED.value
    ds.UnifiedProcedureStepPerformedProcedureSequence = []
    return ds


def _request(header: Dataset) -> Dataset:
    item = Dataset()
    item.StudyInstanceUID = header.StudyInstanceUID
    item.AccessionNumber = header.get("AccessionNumber", "")
    item.IssuerOfAccessionNumberSequence = header.get("IssuerOfAccessionNumberSequence", [])
    requested = (header.get("RequestAttributesSequence") or [Dataset()])[0]
    item.RequestedProcedureID = requested.get("RequestedProcedureID", "")
    item.RequestedProcedureDescription = header.get("StudyDescription", "")
    item.RequestedProcedureCodeSequence = header.get("ProcedureCodeSequence", [])
    item.PlacerOrderNumberImagingServiceRequest = ""
    item.FillerOrderNumberImagingServiceRequest = ""
    return item


def _label(header: Dataset) -> str:
    described = str(header.get("StudyDescription", "")).strip()
    return f"Read {described or header.get('Modality', 'study')}"[:64]


def input_information(
    header: Dataset, instances: Iterable[Instance], retrieve_ae: str
) -> list[Dataset]:
    by_series: dict[str, list[Instance]] = defaultdict(list)
    for instance in instances:
        by_series[instance.series_uid].append(instance)
    items = []
    for series_uid, members in sorted(by_series.items()):
        item = Dataset()
        item.StudyInstanceUID = header.StudyInstanceUID
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
    ds = dataset_of(item)
    chosen = {
        row.ae_title
        for row in rows
        if row.workitem_uid != FILTERED_GLOBAL_SUBSCRIPTION
        or matches(ds, Dataset.from_json(row.filter))
    }
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
