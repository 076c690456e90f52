"""UPS going out: N-EVENT-REPORTs to subscribers, and workitems pushed to another UPS SCP.

Event reports go on an association cadnode opens to the subscriber's configured address,
under the UPS Event SOP Class, naming the UPS Push SOP Class as the instance's class
(PS3.4 CC.2.4.3). Pushing creates the workitem on the external SCP (N-CREATE) the first
time and updates its priority (N-SET) afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

from cadnode.core.config import Destination
from cadnode.core.db import PublicationChannel
from cadnode.dicom.pdu import tune_connection
from cadnode.dicom.status import DUPLICATE_INSTANCE, status_is_success
from cadnode.prioritize.notice import Link, Notice, PublishError
from cadnode.prioritize.worklist import UPS_EVENT, UPS_PULL, UPS_PUSH

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@contextlib.contextmanager
def _association(
    calling_ae: str, destination: Destination, sop_classes: list[str], timeout_s: float
) -> Iterator[Association]:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)],
    )
    if not assoc.is_established:
        raise PublishError(f"association with {destination} not established")
    try:
        yield assoc
    finally:
        assoc.release()


def _check(status: Dataset | None, what: str) -> int:
    code = int(status.Status) if status is not None and "Status" in status else None
    if code is None:
        raise PublishError(f"{what}: no response (timeout or abort)")
    if not status_is_success(code) and code != DUPLICATE_INSTANCE:
        raise PublishError(f"{what} failed: status 0x{code:04X}")
    return code


class UpsEventChannel:
    """Destination: the subscriber's AE title, resolved through the configured destinations."""

    name = PublicationChannel.ups_event

    def __init__(
        self, calling_ae: str, subscribers: Mapping[str, Destination], timeout_s: float
    ) -> None:
        self.calling_ae = calling_ae
        self.subscribers = subscribers
        self.timeout_s = timeout_s

    @contextlib.contextmanager
    def connect(self, destination: str) -> Iterator[Link]:
        address = self.subscribers.get(destination)
        if address is None:
            raise PublishError(f"subscriber {destination!r} is not a configured destination")
        with _association(self.calling_ae, address, [UPS_EVENT], self.timeout_s) as assoc:
            yield EventLink(assoc)


class EventLink:
    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.message_id = 0

    def send(self, notice: Notice) -> None:
        self.message_id += 1
        status, _reply = self.assoc.send_n_event_report(
            Dataset.from_json(notice.payload["info"]),
            int(notice.payload["event_type"]),
            UPS_PUSH,
            str(notice.payload["workitem"]),
            msg_id=self.message_id,
            meta_uid=UPS_EVENT,
        )
        _check(status, "N-EVENT-REPORT")


class UpsPushChannel:
    """Destination: the name of a configured destination (an external UPS Push SCP)."""

    name = PublicationChannel.ups_push

    def __init__(
        self, calling_ae: str, destinations: Mapping[str, Destination], timeout_s: float
    ) -> None:
        self.calling_ae = calling_ae
        self.destinations = destinations
        self.timeout_s = timeout_s

    @contextlib.contextmanager
    def connect(self, destination: str) -> Iterator[Link]:
        address = self.destinations.get(destination)
        if address is None:
            raise PublishError(f"destination {destination!r} is no longer configured")
        classes = [UPS_PUSH, UPS_PULL]
        with _association(self.calling_ae, address, classes, self.timeout_s) as assoc:
            yield PushLink(assoc)


class PushLink:
    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc

    def send(self, notice: Notice) -> None:
        workitem = notice.workitem
        uid = str(workitem.SOPInstanceUID)
        if not notice.delivered_before:
            created = Dataset()
            created.update(workitem)
            del created.SOPInstanceUID  # N-CREATE names the instance in its Affected SOP UID
            del created.SOPClassUID
            status, _ = self.assoc.send_n_create(created, UPS_PUSH, uid)
            if _check(status, "N-CREATE") != DUPLICATE_INSTANCE:
                return
        changes = Dataset()  # already there: a SCHEDULED UPS may be N-SET without a lock
        changes.ScheduledProcedureStepPriority = workitem.ScheduledProcedureStepPriority
        changes.CommentsOnTheScheduledProcedureStep = workitem.get(
            "CommentsOnTheScheduledProcedureStep", ""
        )
        changes.InputReadinessState = workitem.InputReadinessState
        if "ExpectedCompletionDateTime" in workitem:  # moves with the priority
            changes.ExpectedCompletionDateTime = workitem.ExpectedCompletionDateTime
        status, _ = self.assoc.send_n_set(changes, UPS_PUSH, uid, meta_uid=UPS_PULL)
        _check(status, "N-SET")
