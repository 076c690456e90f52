"""Dispatch: the outbox. C-STORE every result object to every destination, exactly once.

Each (object, destination) pair is a Delivery row (queued by route and encode through
cadnode/deliver/outbox.py): pending until the peer acknowledges it, then sent. A failed
attempt is retried with exponential back-off (the next attempt time is in the database, so a
restart resumes the schedule); after the configured number of attempts the delivery is
dead-lettered and its job failed (`FailureKind.dead_letter`, with the reason in words).
Original images that a routing rule forwards go through the same outbox. An admin replays
or discards dead letters with `cadnode deliveries` (cadnode/deliver/outbox_admin.py);
destinations with `storage_commitment` are then asked to confirm they keep each object
(cadnode/deliver/commitment.py).

Exactly once, as far as a network allows: a delivery is recorded `sent` in its own commit
the moment the peer's C-STORE response says Success, before the next object goes, and is
never sent again after that commit. Two windows remain, both at-least-once, never lost: a
crash between the response and that commit (milliseconds), and a response that never comes
(timeout, abort) for an object the peer did keep. Either way the same object is sent again
with the same SOP Instance UID, which a PACS stores once (it replaces or ignores the copy).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from sqlmodel import Session, select

from cadnode.core import audit
from cadnode.core.config import Destination, DispatchSettings
from cadnode.core.db import (
    AuditOutcome,
    Database,
    Delivery,
    DeliveryState,
    FailureKind,
    Instance,
    JobState,
    ResultObject,
    utcnow,
)
from cadnode.deliver.commitment import STORAGE_COMMITMENT, Commitments, CommitmentScp
from cadnode.deliver.outbox import record_failure, record_sent
from cadnode.dicom.pdu import tune_connection
from cadnode.dicom.status import status_is_success

log = structlog.get_logger("cadnode.deliver.dispatch")

# A job failed by a dead letter, in words (the kind is FailureKind.dead_letter).
DEAD_LETTER = "a result could not be delivered (dead letter)"


class Dispatcher:
    name = "dispatch"

    def __init__(
        self,
        database: Database,
        results: Path,
        settings: DispatchSettings,
        calling_ae: str,
        spool: Path | None = None,
        destinations: Iterable[Destination] = (),
    ) -> None:
        self.database = database
        self.results = results
        self.spool = spool  # where originals that rules forward are read from
        self.settings = settings
        self.calling_ae = calling_ae
        # The configured destinations, for their options (deliveries name them as AE@host:port).
        self.commitments = Commitments(settings, destinations)
        # A commitment answer may come on dispatch's own association, while it is still open.
        self.commitment_reports = CommitmentScp(database)

    def advance(self) -> float | None:
        with self.database.session() as session:
            now = utcnow()
            due = session.exec(
                select(Delivery)
                .where(Delivery.state == DeliveryState.pending, Delivery.next_attempt_at <= now)
                .order_by(Delivery.id)  # type: ignore[arg-type]
            ).all()
            by_destination: dict[str, list[Delivery]] = defaultdict(list)
            for delivery in due:
                by_destination[delivery.destination].append(delivery)
            for destination, deliveries in by_destination.items():
                self._send(session, destination, deliveries)
            for destination, transactions in self.commitments.due(session).items():
                self._ask_again(session, destination, transactions)
            self._settle_jobs(session)
            delays = [
                self._seconds_to_next_attempt(session),
                self.commitments.seconds_to_next(session),
            ]
            return min((d for d in delays if d is not None), default=None)

    def _send(self, session: Session, destination: str, deliveries: list[Delivery]) -> None:
        datasets = [dcmread(self._path_of(session, d.object_uid)) for d in deliveries]
        commit = self.commitments.wanted(destination)
        contexts = _contexts(datasets)
        if commit:
            contexts.append((STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        assoc = self._associate(destination, contexts)
        if not assoc.is_established:
            for delivery in deliveries:
                self._failed(session, delivery, NOT_ESTABLISHED)
            return
        try:
            sent = [
                (delivery, str(dataset.SOPClassUID))
                for delivery, dataset in zip(deliveries, datasets, strict=True)
                if self._store(session, assoc, delivery, dataset)
            ]
            if commit and sent:
                sop_classes = {d.object_uid: sop_class for d, sop_class in sent}
                self.commitments.request(session, assoc, [d for d, _ in sent], sop_classes)
        finally:
            assoc.release()

    def _ask_again(
        self, session: Session, destination: str, transactions: list[list[Delivery]]
    ) -> None:
        """Storage Commitment requests that got no answer (or were never made), made again."""
        assoc = self._associate(
            destination, [(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        )
        try:
            for deliveries in transactions:
                if not assoc.is_established:  # counts as a request; asked again after the timeout
                    self.commitments.request_failed(session, deliveries, NOT_ESTABLISHED)
                    continue
                sop_classes = {d.object_uid: self._sop_class_of(session, d) for d in deliveries}
                self.commitments.request(session, assoc, deliveries, sop_classes)
        finally:
            if assoc.is_established:
                assoc.release()

    def _associate(self, destination: str, contexts: list[tuple[str, list[str]]]) -> Association:
        address = Destination.parse(destination)
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
        return ae.associate(
            address.host,
            address.port,
            ae_title=address.ae_title,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, tune_connection),
                (evt.EVT_N_EVENT_REPORT, self.commitment_reports.on_event_report),
            ],
        )

    def _sop_class_of(self, session: Session, delivery: Delivery) -> str:
        path = self._path_of(session, delivery.object_uid)
        header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return str(header.SOPClassUID)

    def _path_of(self, session: Session, uid: str) -> Path:
        """A result cadnode made, or an original image a rule forwards as it was received."""
        made = session.get(ResultObject, uid)
        if made is not None:
            return self.results / made.path
        original = session.get(Instance, uid)
        if original is None or self.spool is None:
            raise LookupError(f"delivery of {uid}: neither a result nor a received instance")
        return self.spool / original.path

    def _store(
        self, session: Session, assoc: Association, delivery: Delivery, dataset: Dataset
    ) -> bool:
        """C-STORE one object; True once the peer has it and that is committed."""
        session.refresh(delivery)  # an admin may have discarded it while earlier ones went
        if delivery.state is not DeliveryState.pending:
            return False
        try:
            status = assoc.send_c_store(dataset)
        except Exception as error:
            self._failed(session, delivery, f"C-STORE raised {type(error).__name__}: {error}")
            return False
        code = int(status.Status) if status else None
        if code is None or not status_is_success(code):
            shown = "no response (timeout or abort)" if code is None else f"status 0x{code:04X}"
            self._failed(session, delivery, f"C-STORE failed: {shown}")
            return False
        # The peer has it: record that before anything else (the window in the module's doc).
        record_sent(delivery)
        session.add(delivery)
        session.commit()
        log.info(
            "delivery.sent",
            delivery=delivery.id,
            job=delivery.job_id,
            destination=delivery.destination,
            attempts=delivery.attempts,
            status=f"0x{code:04X}",
        )
        audit.record(
            self.database,
            audit.RESULT_DELIVERED,
            actor=self.calling_ae,
            address=delivery.destination,
            outcome=AuditOutcome.sent,
            delivery=delivery.id,
            job=delivery.job_id,
            object_uid=delivery.object_uid,
            sop_class_uid=str(dataset.SOPClassUID),
            status=f"0x{code:04X}",
            attempts=delivery.attempts,
        )
        return True

    def _failed(self, session: Session, delivery: Delivery, reason: str) -> None:
        dead = record_failure(delivery, reason, self.settings.backoff)
        session.add(delivery)
        session.commit()
        log.warning(
            "delivery.dead_lettered" if dead else "delivery.retry_scheduled",
            delivery=delivery.id,
            job=delivery.job_id,
            destination=delivery.destination,
            attempts=delivery.attempts,
            reason=reason,
        )

    def _settle_jobs(self, session: Session) -> None:
        """An encoded job is delivered once all its deliveries are sent (or discarded by an
        admin); failed if any died."""
        for job in self.database.jobs_in(session, JobState.encoded):
            states = set(session.exec(select(Delivery.state).where(Delivery.job_id == job.id)))
            if not states:
                continue  # no destinations configured: results stay local, job stays encoded
            if DeliveryState.failed in states:
                self.database.transition(
                    session,
                    job,
                    JobState.failed,
                    expect=JobState.encoded,
                    reason=DEAD_LETTER,
                    failure=FailureKind.dead_letter,
                )
            elif states <= {DeliveryState.sent, DeliveryState.discarded}:
                discarded = {"reason": "delivered except what an admin discarded"}
                self.database.transition(
                    session,
                    job,
                    JobState.delivered,
                    expect=JobState.encoded,
                    **(discarded if DeliveryState.discarded in states else {}),
                )

    def _seconds_to_next_attempt(self, session: Session) -> float | None:
        upcoming = session.exec(
            select(Delivery.next_attempt_at)
            .where(Delivery.state == DeliveryState.pending)
            .order_by(Delivery.next_attempt_at)  # type: ignore[arg-type]
        ).first()
        return None if upcoming is None else max((upcoming - utcnow()).total_seconds(), 0.0)


NOT_ESTABLISHED = "association not established (refused, rejected or unreachable)"


def _contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    """Uncompressed objects (our results) in either little endian syntax; anything else (a
    forwarded original) in its own transfer syntax, as the modality sent it."""
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for dataset in datasets:
        syntax = str(dataset.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
        syntaxes = uncompressed if syntax in uncompressed else [syntax]
        wanted[(str(dataset.SOPClassUID), tuple(syntaxes))] = None
    return [(sop_class, list(syntaxes)) for sop_class, syntaxes in wanted]
