"""Storage Commitment (push model): dispatch asks a PACS to confirm it keeps what it was sent.

After its C-STOREs to a destination with `storage_commitment`, dispatch asks on the same
association (N-ACTION, action type 1) whether the peer takes responsibility for those objects,
under one Transaction UID recorded on each delivery before the request leaves. The peer answers
later with an N-EVENT-REPORT (event type 1: all kept; 2: some failed), on that association if
it is still open, else on one it opens to the node's DICOM port, where `CommitmentScp` serves
it. A request left unanswered for `dispatch.commitment_timeout_s` is made again, with the same
Transaction UID so a late answer still counts; after `dispatch.commitment_max_requests` the
commitment is marked failed. A failed commitment leaves the delivery sent; an admin's
`cadnode deliveries retry` sends it again.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import structlog
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt, sop_class
from pynetdicom.association import Association
from sqlalchemy import update
from sqlmodel import Session, col, select

from cadnode.core.config import AnyDestination, Destination, DispatchSettings
from cadnode.core.db import Database, Delivery, DeliveryState, utcnow
from cadnode.dicom.services import Service
from cadnode.dicom.status import NO_SUCH_INSTANCE, PROCESSING_FAILURE, SUCCESS, status_is_success

log = structlog.get_logger("cadnode.deliver.commitment")

STORAGE_COMMITMENT = sop_class.StorageCommitmentPushModel  # type: ignore[attr-defined]
STORAGE_COMMITMENT_INSTANCE = sop_class.StorageCommitmentPushModelInstance  # well-known
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3)

# Failure Reason (0008,1197) values, PS3.3 C.14.1.1.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}


class Commitments:
    """Dispatch's side: ask, ask again when no answer comes, and give up after the limit."""

    def __init__(
        self, settings: DispatchSettings, destinations: Mapping[str, AnyDestination]
    ) -> None:
        self.settings = settings
        # By name, as deliveries name their destination; only DICOM peers are asked.
        self.wanted_by = {
            name
            for name, d in destinations.items()
            if isinstance(d, Destination) and d.storage_commitment
        }

    def wanted(self, destination: str) -> bool:
        return destination in self.wanted_by

    def request(
        self,
        session: Session,
        assoc: Association,
        deliveries: list[Delivery],
        sop_classes: Mapping[str, str],
    ) -> None:
        """Ask for `deliveries` (sent, same destination) in one N-ACTION.

        The Transaction UID is committed before the request leaves, so an answer that comes
        at once on another association finds it. A delivery asked before keeps its UID.
        """
        if not deliveries:
            return
        transaction = deliveries[0].commitment_transaction_uid or str(generate_uid())
        now = utcnow()
        for delivery in deliveries:
            delivery.commitment_transaction_uid = transaction
            delivery.commitment_requested_at = now
            delivery.commitment_requests += 1
            session.add(delivery)
        session.commit()
        ids = [d.id for d in deliveries]
        try:
            status, _reply = assoc.send_n_action(
                request_dataset(
                    transaction, [(sop_classes[d.object_uid], d.object_uid) for d in deliveries]
                ),
                REQUEST_COMMITMENT,
                STORAGE_COMMITMENT,
                STORAGE_COMMITMENT_INSTANCE,
            )
        except ValueError:  # pynetdicom: no accepted presentation context for the class
            self.fail(session, deliveries, "the destination does not support Storage Commitment")
            return
        code = int(status.Status) if status is not None and "Status" in status else None
        if code is None or not status_is_success(code):
            shown = "no response" if code is None else f"status 0x{code:04X}"
            log.warning("delivery.commitment_request_failed", deliveries=ids, reason=shown)
            return  # asked again after the timeout, like a request that got no answer
        log.info(
            "delivery.commitment_requested",
            deliveries=ids,
            destination=deliveries[0].destination,
            transaction=transaction,
            request=deliveries[0].commitment_requests,
        )

    def request_failed(self, session: Session, deliveries: list[Delivery], reason: str) -> None:
        """A request that could not be made counts as one: asked again after the timeout."""
        now = utcnow()
        for delivery in deliveries:
            delivery.commitment_requested_at = now
            delivery.commitment_requests += 1
            session.add(delivery)
        session.commit()
        ids = [d.id for d in deliveries]
        log.warning("delivery.commitment_request_failed", deliveries=ids, reason=reason)

    def due(self, session: Session) -> dict[str, list[list[Delivery]]]:
        """Requests to make again, by destination, each a list of one transaction's deliveries;
        the ones past their last request's timeout are marked failed instead."""
        by_destination: dict[str, dict[str, list[Delivery]]] = defaultdict(dict)
        expired = []
        for delivery in self._awaiting(session):
            if delivery.commitment_requested_at is None:
                by_destination[delivery.destination].setdefault("", []).append(delivery)
            elif self._deadline(delivery) <= utcnow():
                if delivery.commitment_requests >= self.settings.commitment_max_requests:
                    expired.append(delivery)
                else:
                    transaction = delivery.commitment_transaction_uid or ""
                    by_destination[delivery.destination].setdefault(transaction, []).append(
                        delivery
                    )
        if expired:
            requests = self.settings.commitment_max_requests
            self.fail(session, expired, f"no answer to {requests} request(s)")
        return {dest: list(groups.values()) for dest, groups in by_destination.items()}

    def seconds_to_next(self, session: Session) -> float | None:
        deadlines = [self._deadline(d) for d in self._awaiting(session)]
        return None if not deadlines else max((min(deadlines) - utcnow()).total_seconds(), 0.0)

    def _awaiting(self, session: Session) -> list[Delivery]:
        if not self.wanted_by:
            return []
        return list(
            session.exec(
                select(Delivery).where(
                    col(Delivery.destination).in_(self.wanted_by),
                    Delivery.state == DeliveryState.sent,
                    col(Delivery.committed_at).is_(None),
                    col(Delivery.commitment_failure).is_(None),
                )
            )
        )

    def _deadline(self, delivery: Delivery) -> dt.datetime:
        asked = delivery.commitment_requested_at
        if asked is None:
            return utcnow()
        if asked.tzinfo is None:  # SQLite keeps no zone; cadnode writes UTC
            asked = asked.replace(tzinfo=dt.UTC)
        return asked + dt.timedelta(seconds=self.settings.commitment_timeout_s)

    @staticmethod
    def fail(session: Session, deliveries: list[Delivery], reason: str, detail: str = "") -> None:
        """The commitment of `deliveries` failed for `reason`; they stay sent. The rows keep
        `reason: detail`, the log only `reason` (`detail` may be a path naming a study)."""
        for delivery in deliveries:
            delivery.commitment_failure = f"{reason}: {detail}" if detail else reason
            session.add(delivery)
        session.commit()
        for delivery in deliveries:
            log.warning(
                "delivery.commitment_failed",
                delivery=delivery.id,
                job=delivery.job_id,
                destination=delivery.destination,
                reason=reason,
            )


def failure_text(code: int) -> str:
    """A Failure Reason as shown: its code, and its meaning where the standard gives one."""
    meaning = FAILURE_REASONS.get(code)
    return f"0x{code:04X} {meaning}" if meaning else f"0x{code:04X}"


def request_dataset(transaction_uid: str, references: list[tuple[str, str]]) -> Dataset:
    """The N-ACTION's Action Information: the Transaction UID and the objects to commit."""
    request = Dataset()
    request.TransactionUID = transaction_uid
    request.ReferencedSOPSequence = [_reference(cls, uid) for cls, uid in references]
    return request


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


class CommitmentScp:
    """The PACS's answers, on the node's DICOM port (and on dispatch's own associations)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def service(self) -> Service:
        return Service(
            name="storage-commitment",
            sop_classes=(STORAGE_COMMITMENT,),
            handlers={evt.EVT_N_EVENT_REPORT: self.on_event_report},
        )

    def on_event_report(self, event: Any) -> tuple[int, None]:
        report = event.event_information
        transaction = str(report.get("TransactionUID", ""))
        peer = str(event.assoc.remote.get("ae_title", "")).strip()
        if event.event_type not in (ALL_COMMITTED, SOME_FAILED) or not transaction:
            log.warning("commitment.report_refused", peer=peer, event_type=event.event_type)
            return PROCESSING_FAILURE, None
        committed = [
            str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])
        ]
        failed = {
            str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", PROCESSING_FAILURE))
            for i in report.get("FailedSOPSequence", [])
        }
        matched = self.record(transaction, committed, failed)
        if not matched:
            log.warning("commitment.unknown_transaction", peer=peer, transaction=transaction)
            return NO_SUCH_INSTANCE, None
        return SUCCESS, None

    def record(self, transaction: str, committed: list[str], failed: Mapping[str, int]) -> int:
        """Write the answer onto the transaction's deliveries; how many it named."""
        now = utcnow()
        in_transaction = Delivery.commitment_transaction_uid == transaction
        matched = 0
        with self.database.session() as session:
            rows = {d.object_uid: d for d in session.exec(select(Delivery).where(in_transaction))}
            answers: list[tuple[str, dict[str, Any]]] = [
                (uid, {"committed_at": now, "commitment_failure": None}) for uid in committed
            ]
            answers += [
                (uid, {"commitment_failure": failure_text(code)}) for uid, code in failed.items()
            ]
            for uid, values in answers:
                delivery = rows.get(uid)
                if delivery is None:
                    continue
                # One UPDATE of these columns: dispatch may be writing the row's others.
                session.execute(
                    update(Delivery).where(col(Delivery.id) == delivery.id).values(**values)
                )
                matched += 1
                self._log(delivery, values)
            session.commit()
        return matched

    @staticmethod
    def _log(delivery: Delivery, values: Mapping[str, Any]) -> None:
        fields = {
            "delivery": delivery.id,
            "job": delivery.job_id,
            "destination": delivery.destination,
        }
        if values.get("committed_at"):
            log.info("delivery.committed", **fields)
        else:
            log.warning("delivery.commitment_failed", reason=values["commitment_failure"], **fields)
