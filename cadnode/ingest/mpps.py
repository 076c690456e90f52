"""Modality Performed Procedure Step SCP: the modality says when it has finished a study.

A modality N-CREATEs an MPPS (IN PROGRESS) when acquisition starts and N-SETs it COMPLETED
(or DISCONTINUED) when it ends, listing the images it made. Each MPPS is kept in the
database; COMPLETED records a completion signal per study it names, with the instances it
lists, so assemble can release the study once they have all arrived (PS3.4 annex F).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from cadnode.core.db import (
    CompletionSignal,
    CompletionSource,
    Database,
    MppsStatus,
    PerformedProcedureStep,
    utcnow,
)
from cadnode.core.files import is_valid_uid
from cadnode.dicom.services import Service
from cadnode.dicom.status import (
    DUPLICATE_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    NO_SUCH_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
)

log = structlog.get_logger("cadnode.ingest.mpps")


class MppsScp:
    def __init__(self, database: Database, on_signal: Callable[[], None]) -> None:
        self.database = database
        self.on_signal = on_signal

    def service(self) -> Service:
        return Service(
            name="mpps",
            sop_classes=(str(ModalityPerformedProcedureStep),),
            handlers={evt.EVT_N_CREATE: self.on_create, evt.EVT_N_SET: self.on_set},
        )

    def on_create(self, event: Any) -> tuple[int, Dataset | None]:
        uid = event.request.AffectedSOPInstanceUID
        attributes: Dataset = event.attribute_list
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        if uid is None or not is_valid_uid(str(uid)):
            return _refused(MISSING_ATTRIBUTE, "no valid Affected SOP Instance UID", calling_ae)
        status = str(attributes.get("PerformedProcedureStepStatus", ""))
        if status != MppsStatus.IN_PROGRESS:
            return _refused(INVALID_ATTRIBUTE_VALUE, f"created as {status!r}", calling_ae)
        with self.database.session() as session:
            if session.get(PerformedProcedureStep, str(uid)) is not None:
                return _refused(DUPLICATE_INSTANCE, "already created", calling_ae)
            session.add(
                PerformedProcedureStep(
                    sop_instance_uid=str(uid),
                    status=MppsStatus.IN_PROGRESS,
                    calling_ae=calling_ae,
                    dataset=attributes.to_json_dict(),
                )
            )
            session.commit()
        log.info("mpps.created", calling_ae=calling_ae, studies=len(study_uids(attributes)))
        return SUCCESS, attributes

    def on_set(self, event: Any) -> tuple[int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID)
        changes: Dataset = event.modification_list
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        with self.database.session() as session:
            step = session.get(PerformedProcedureStep, uid)
            if step is None:
                return _refused(NO_SUCH_INSTANCE, "no such MPPS", calling_ae)
            if step.status is not MppsStatus.IN_PROGRESS:
                return _refused(
                    PROCESSING_FAILURE, f"{step.status.value}: no longer updated", calling_ae
                )
            dataset = Dataset.from_json(step.dataset)
            dataset.update(changes)
            asked = str(dataset.get("PerformedProcedureStepStatus", MppsStatus.IN_PROGRESS))
            if asked not in {status.value for status in MppsStatus}:
                return _refused(INVALID_ATTRIBUTE_VALUE, f"set to {asked!r}", calling_ae)
            step.dataset = dataset.to_json_dict()
            step.status = MppsStatus(asked)
            step.updated_at = utcnow()
            session.add(step)
            signals = _completion_signals(dataset) if step.status is MppsStatus.COMPLETED else []
            session.add_all(signals)
            session.commit()
        log.info("mpps.updated", calling_ae=calling_ae, status=step.status.value)
        if signals:
            expected = len(signals[0].expected)
            log.info("mpps.completed", calling_ae=calling_ae, studies=len(signals), images=expected)
            self.on_signal()
        return SUCCESS, changes


def study_uids(dataset: Dataset) -> list[str]:
    """The studies an MPPS is for, from its Scheduled Step Attributes Sequence."""
    found = (
        str(item.get("StudyInstanceUID", ""))
        for item in _items(dataset, "ScheduledStepAttributesSequence")
    )
    return sorted({uid for uid in found if is_valid_uid(uid)})


def performed_instances(dataset: Dataset) -> list[str]:
    """The SOP Instance UIDs the MPPS says were made, from its Performed Series Sequence."""
    uids = []
    for series in _items(dataset, "PerformedSeriesSequence"):
        for keyword in (
            "ReferencedImageSequence",
            "ReferencedNonImageCompositeSOPInstanceSequence",
        ):
            uids += [
                str(item.get("ReferencedSOPInstanceUID", "")) for item in _items(series, keyword)
            ]
    return sorted({uid for uid in uids if is_valid_uid(uid)})


def _completion_signals(dataset: Dataset) -> list[CompletionSignal]:
    expected = performed_instances(dataset)
    return [
        CompletionSignal(study_uid=uid, source=CompletionSource.mpps, expected=expected)
        for uid in study_uids(dataset)
    ]


def _items(dataset: Dataset, keyword: str) -> Iterator[Dataset]:
    yield from dataset.get(keyword) or []


def _refused(status: int, reason: str, calling_ae: str) -> tuple[int, None]:
    log.warning("mpps.refused", calling_ae=calling_ae, status=hex(status), reason=reason)
    return status, None
