"""The UPS SCP: worklist clients query, read, claim and watch cadnode's reading workitems.

Served on the node's DICOM port (receive binds these handlers beside C-STORE), for the
UPS Pull (C-FIND, N-GET, N-SET, N-ACTION change state), Watch (N-ACTION subscribe,
unsubscribe, suspend, request cancel; N-GET; C-FIND) and Query (C-FIND) SOP classes.
Status codes are PS3.4 Annex CC's. Every change queues its N-EVENT-REPORTs in the outbox
in the same commit; the publish stage sends them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import structlog
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pynetdicom import evt
from sqlmodel import Session, col, select

from cadnode.core.config import UpsTurnaround
from cadnode.core.db import (
    Database,
    Priority,
    Study,
    StudyPriority,
    UpsState,
    UpsSubscription,
    Workitem,
)
from cadnode.dicom.matching import matches, response
from cadnode.dicom.services import Service
from cadnode.dicom.status import (
    CANCEL,
    DOES_NOT_MATCH_SOP_CLASS,
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    NO_SUCH_ACTION,
    PENDING,
    SUCCESS,
)
from cadnode.prioritize import worklist
from cadnode.prioritize.worklist import (
    CANCEL_REQUESTED,
    FILTERED_GLOBAL_SUBSCRIPTION,
    FINAL_STATES,
    GLOBAL_SUBSCRIPTION,
    STATE_REPORT,
)

log = structlog.get_logger("cadnode.prioritize.ups")

SCHEDULED, IN_PROGRESS = UpsState.SCHEDULED, UpsState.IN_PROGRESS
COMPLETED, CANCELED = UpsState.COMPLETED, UpsState.CANCELED

ALREADY_CANCELED, ALREADY_COMPLETED = 0xB304, 0xB306
MAY_NO_LONGER_BE_UPDATED, WRONG_TRANSACTION_UID, ALREADY_IN_PROGRESS = 0xC300, 0xC301, 0xC302
ONLY_SCHEDULED_BY_CREATE, NO_SUCH_UPS, UNKNOWN_RECEIVING_AE = 0xC303, 0xC307, 0xC308
NOT_YET_IN_PROGRESS, ALREADY_COMPLETED_FAILURE, NOT_APPROPRIATE = 0xC310, 0xC311, 0xC314

CHANGE_STATE, REQUEST_CANCEL, SUBSCRIBE, UNSUBSCRIBE, SUSPEND_GLOBAL = 1, 2, 3, 4, 5
GLOBAL_UIDS = (GLOBAL_SUBSCRIPTION, FILTERED_GLOBAL_SUBSCRIPTION)
# Attributes an N-SET may not touch: identity, state (N-ACTION's job) and the lock.
PROTECTED = {"SOPClassUID", "SOPInstanceUID", "ProcedureStepState", "TransactionUID"}

Status = tuple[int, Dataset | None]


class UpsScp:
    def __init__(
        self,
        database: Database,
        receiving_aes: Mapping[str, Any],
        turnaround: UpsTurnaround,
    ) -> None:
        self.database = database
        self.turnaround = turnaround  # a new priority moves the expected completion
        # Subscribers must be configured peers: events go to their address, not the caller's.
        self.receiving_aes = receiving_aes

    def service(self) -> Service:
        return Service(
            name="ups",
            sop_classes=(worklist.UPS_PULL, worklist.UPS_WATCH, worklist.UPS_QUERY),
            handlers={
                evt.EVT_C_FIND: self.on_find,
                evt.EVT_N_GET: self.on_get,
                evt.EVT_N_SET: self.on_set,
                evt.EVT_N_ACTION: self.on_action,
            },
        )

    # C-FIND ------------------------------------------------------------------------------

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        try:
            query: Dataset = event.identifier
        except Exception:
            yield DOES_NOT_MATCH_SOP_CLASS, None
            return
        found = 0
        for item in self._candidates(query):
            if event.is_cancelled:
                yield CANCEL, None
                return
            ds = worklist.dataset_of(item)
            if matches(ds, query):
                found += 1
                yield PENDING, response(ds, query)
        log.info("ups.find", calling_ae=_calling_ae(event), matches=found)

    def _candidates(self, query: Dataset) -> list[Workitem]:
        """Narrowed by the study when the query names one; matching does the rest."""
        with self.database.session() as session:
            statement = select(Workitem).order_by(col(Workitem.updated_at))
            study_uid = _requested_study(query)
            if study_uid:
                statement = statement.join(Study).where(Study.study_uid == study_uid)
            return list(session.exec(statement))

    # N-GET -------------------------------------------------------------------------------

    def on_get(self, event: Any) -> Status:
        with self.database.session() as session:
            item = session.get(Workitem, str(event.request.RequestedSOPInstanceUID))
            if item is None:
                return NO_SUCH_UPS, None
            ds = worklist.dataset_of(item)
        wanted = event.request.AttributeIdentifierList or []
        if not wanted:
            return SUCCESS, ds
        answer = Dataset()
        for tag in wanted:
            answer.add(ds[tag] if tag in ds else DataElement(tag, dictionary_VR(tag), None))
        return SUCCESS, answer

    # N-SET -------------------------------------------------------------------------------

    def on_set(self, event: Any) -> Status:
        changes: Dataset = event.modification_list
        calling_ae = _calling_ae(event)
        with worklist.lock(self.database), self.database.session() as session:
            item = session.get(Workitem, str(event.request.RequestedSOPInstanceUID))
            if item is None:
                return NO_SUCH_UPS, None
            if item.state.final:
                return MAY_NO_LONGER_BE_UPDATED, None
            if item.state is IN_PROGRESS and changes.get("TransactionUID") != item.transaction_uid:
                return WRONG_TRANSACTION_UID, None
            priority = changes.get("ScheduledProcedureStepPriority")
            if priority is not None and priority not in Priority.__members__:
                return INVALID_ATTRIBUTE_VALUE, None
            ds = worklist.dataset_of(item)
            before = ds.ScheduledProcedureStepPriority
            for element in changes:
                if element.keyword not in PROTECTED:
                    ds[element.tag] = element
            _restamp(ds, changes, priority, self.turnaround)
            worklist.keep(session, item, ds)
            if priority is not None and priority != before:
                decision = StudyPriority(
                    study_id=item.study_id,
                    level=Priority(priority),
                    reason=f"set by worklist client {calling_ae}",
                    rule="ups-n-set",
                )
                session.add(decision)
                session.flush()
                worklist.queue_event(
                    session, item, STATE_REPORT, worklist.state_report(ds), decision_id=decision.id
                )
            session.commit()
        log.info("ups.set", workitem=item.sop_instance_uid, calling_ae=calling_ae)
        self.database.on_change()  # wakes the publish stage
        return SUCCESS, None

    # N-ACTION ----------------------------------------------------------------------------

    def on_action(self, event: Any) -> Status:
        actions = {
            CHANGE_STATE: self._change_state,
            REQUEST_CANCEL: self._request_cancel,
            SUBSCRIBE: self._subscribe,
            UNSUBSCRIBE: self._unsubscribe,
            SUSPEND_GLOBAL: self._suspend_global,
        }
        action = actions.get(int(event.action_type))
        if action is None:
            return NO_SUCH_ACTION, None
        uid = str(event.request.RequestedSOPInstanceUID)
        info: Dataset = event.action_information
        with worklist.lock(self.database), self.database.session() as session:
            status = action(session, uid, info, _calling_ae(event))
            session.commit()
        log.info(
            "ups.action",
            action=int(event.action_type),
            workitem=uid,
            calling_ae=_calling_ae(event),
            status=f"0x{status:04X}",
        )
        self.database.on_change()  # wakes the publish stage
        return status, None

    def _change_state(self, session: Session, uid: str, info: Dataset, _caller: str) -> int:
        item = session.get(Workitem, uid)
        if item is None:
            return NO_SUCH_UPS
        asked, transaction = str(info.get("ProcedureStepState", "")), info.get("TransactionUID")
        if asked == SCHEDULED:
            return ONLY_SCHEDULED_BY_CREATE
        if asked not in (IN_PROGRESS, COMPLETED, CANCELED):
            return INVALID_ATTRIBUTE_VALUE
        wanted = UpsState(asked)
        refusal = _refusal(item, wanted, transaction)
        if refusal is not None:
            return refusal
        if item.state is wanted:  # COMPLETED again, CANCELED again: a warning, no change
            return ALREADY_COMPLETED if wanted is COMPLETED else ALREADY_CANCELED
        if wanted is IN_PROGRESS:
            item.transaction_uid = str(transaction)
        self._set_state(session, item, wanted)
        return SUCCESS

    def _request_cancel(self, session: Session, uid: str, info: Dataset, caller: str) -> int:
        item = session.get(Workitem, uid)
        if item is None:
            return NO_SUCH_UPS
        if item.state is CANCELED:
            return ALREADY_CANCELED
        if item.state is COMPLETED:
            return ALREADY_COMPLETED_FAILURE
        reason = info.get("ReasonForCancellation") if info is not None else None
        if item.state is SCHEDULED:  # nobody performs it: cancel it, through IN PROGRESS
            self._set_state(session, item, IN_PROGRESS)
            self._set_state(session, item, CANCELED, reason=reason)
            return SUCCESS
        notice = Dataset()  # IN PROGRESS: the performer decides; tell the subscribers
        notice.RequestingAE = caller
        if reason:
            notice.ReasonForCancellation = reason
        worklist.queue_event(session, item, CANCEL_REQUESTED, notice)
        return SUCCESS

    def _set_state(
        self, session: Session, item: Workitem, state: UpsState, reason: str | None = None
    ) -> None:
        ds = worklist.dataset_of(item)
        ds.ProcedureStepState = state.value
        if reason:
            ds.ReasonForCancellation = reason
        worklist.keep(session, item, ds)
        worklist.queue_event(session, item, STATE_REPORT, worklist.state_report(ds))

    def _subscribe(self, session: Session, uid: str, info: Dataset, _caller: str) -> int:
        ae_title = str(info.get("ReceivingAE", "")).strip() if info is not None else ""
        if not ae_title:
            return MISSING_ATTRIBUTE
        if ae_title not in self.receiving_aes:
            return UNKNOWN_RECEIVING_AE
        if uid not in GLOBAL_UIDS and session.get(Workitem, uid) is None:
            return NO_SUCH_UPS
        lock = str(info.get("DeletionLock", "FALSE")).upper() == "TRUE"
        keys = Dataset()
        if uid == FILTERED_GLOBAL_SUBSCRIPTION:
            for element in info:
                if element.keyword not in ("ReceivingAE", "DeletionLock"):
                    keys.add(element)
        subscription = session.exec(
            select(UpsSubscription).where(
                UpsSubscription.ae_title == ae_title, UpsSubscription.workitem_uid == uid
            )
        ).first() or UpsSubscription(ae_title=ae_title, workitem_uid=uid)
        subscription.deletion_lock = lock
        subscription.filter = keys.to_json_dict()
        session.add(subscription)
        self._initial_reports(session, uid, ae_title, lock)
        return SUCCESS

    def _initial_reports(self, session: Session, uid: str, ae_title: str, lock: bool) -> None:
        """PS3.4 CC.2.4.3: the current state of the UPS subscribed to, or, for a global
        subscription with lock, of every UPS (the open ones: final ones no longer change)."""
        if uid == GLOBAL_SUBSCRIPTION and lock:
            items = session.exec(
                select(Workitem).where(col(Workitem.state).not_in(FINAL_STATES))
            ).all()
        elif uid in GLOBAL_UIDS:
            items = []
        else:
            item = session.get(Workitem, uid)
            items = [item] if item is not None else []
        for item in items:
            report = worklist.state_report(worklist.dataset_of(item))
            worklist.queue_event(session, item, STATE_REPORT, report, recipients=[ae_title])

    def _unsubscribe(self, session: Session, uid: str, info: Dataset, _caller: str) -> int:
        ae_title = str(info.get("ReceivingAE", "")).strip() if info is not None else ""
        if not ae_title:
            return MISSING_ATTRIBUTE
        statement = select(UpsSubscription).where(UpsSubscription.ae_title == ae_title)
        if uid not in GLOBAL_UIDS:  # one workitem; a global unsubscribe ends them all
            if session.get(Workitem, uid) is None:
                return NO_SUCH_UPS
            statement = statement.where(UpsSubscription.workitem_uid == uid)
        for subscription in session.exec(statement):
            session.delete(subscription)
        return SUCCESS

    def _suspend_global(self, session: Session, uid: str, info: Dataset, _caller: str) -> int:
        """Stop subscribing to new workitems, keep the existing subscriptions."""
        if uid not in GLOBAL_UIDS:
            return NOT_APPROPRIATE
        ae_title = str(info.get("ReceivingAE", "")).strip() if info is not None else ""
        for subscription in session.exec(
            select(UpsSubscription).where(
                UpsSubscription.ae_title == ae_title,
                col(UpsSubscription.workitem_uid).in_(GLOBAL_UIDS),
            )
        ):
            session.delete(subscription)
        return SUCCESS


def _restamp(
    ds: Dataset, changes: Dataset, priority: str | None, turnaround: UpsTurnaround
) -> None:
    """The SCP's part of an N-SET (PS3.4 Table CC.2.5-3): the modification time is the N-SET's,
    and a new priority moves the expected completion, unless the client set that too."""
    if priority is not None and "ExpectedCompletionDateTime" not in changes:
        worklist.reprioritize(ds, Priority(priority), turnaround)
    else:
        worklist.touch(ds)


def _refusal(item: Workitem, wanted: UpsState, transaction: Any) -> int | None:
    """PS3.4 Table CC.1.1-2: why a Change State is refused, or None."""
    if wanted is IN_PROGRESS:
        if item.state is SCHEDULED:
            return None if transaction else WRONG_TRANSACTION_UID
        if transaction != item.transaction_uid:
            return WRONG_TRANSACTION_UID
        return ALREADY_IN_PROGRESS if item.state is IN_PROGRESS else MAY_NO_LONGER_BE_UPDATED
    # COMPLETED or CANCELED
    if item.state is SCHEDULED:
        return NOT_YET_IN_PROGRESS
    if transaction != item.transaction_uid:
        return WRONG_TRANSACTION_UID
    if item.state.final and item.state is not wanted:
        return MAY_NO_LONGER_BE_UPDATED
    return None


def _requested_study(query: Dataset) -> str | None:
    """The single Study Instance UID inside the query's Referenced Request Sequence."""
    requests = query.get("ReferencedRequestSequence")
    if not requests:
        return None
    element = requests[0].get((0x0020, 0x000D))  # Study Instance UID
    if element is None or element.VM != 1 or any(c in str(element.value) for c in "*?"):
        return None
    return str(element.value)


def _calling_ae(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()
