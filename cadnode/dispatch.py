"""Dispatch: the outbox. C-STORE every result object to every destination, exactly once.

Each (object, destination) pair is a Delivery row: pending until the peer acknowledges it,
then sent. A failed attempt is retried with exponential back-off (the next attempt time is
in the database, so a restart resumes the schedule); after the configured number of
attempts the delivery is dead-lettered and its job marked failed, with the reason.
Original images that a routing rule forwards go through the same outbox.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import structlog
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from sqlmodel import Session, select

from cadnode.config import Destination, DispatchSettings
from cadnode.db import (
    Database,
    Delivery,
    DeliveryState,
    Instance,
    JobState,
    ResultObject,
    utcnow,
)
from cadnode.dicomnet import set_tcp_nodelay, status_is_success

log = structlog.get_logger("cadnode.dispatch")


def next_attempt_at(settings: DispatchSettings, attempts: int) -> dt.datetime | None:
    """When to try again after `attempts` failed tries: exponential back-off up to its
    ceiling, or None once the limit is reached (dead letter). Shared by every outbox."""
    if attempts >= settings.max_attempts:
        return None
    delay = min(settings.backoff_initial_s * 2 ** (attempts - 1), settings.backoff_max_s)
    return utcnow() + dt.timedelta(seconds=delay)


class Dispatcher:
    name = "dispatch"

    def __init__(
        self,
        database: Database,
        results: Path,
        settings: DispatchSettings,
        calling_ae: str,
        spool: Path | None = None,
    ) -> None:
        self.database = database
        self.results = results
        self.spool = spool  # where originals that rules forward are read from
        self.settings = settings
        self.calling_ae = calling_ae

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
                self._send(session, Destination.parse(destination), deliveries)
            self._settle_jobs(session)
            return self._seconds_to_next_attempt(session)

    def _send(self, session: Session, destination: Destination, deliveries: list[Delivery]) -> None:
        datasets = [dcmread(self._path_of(session, d.object_uid)) for d in deliveries]
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        for sop_class, syntaxes in _contexts(datasets):
            ae.add_requested_context(sop_class, syntaxes)
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
        )
        if not assoc.is_established:
            for delivery in deliveries:
                self._failed(
                    session,
                    delivery,
                    "association not established (refused, rejected or unreachable)",
                )
            return
        try:
            for delivery, dataset in zip(deliveries, datasets, strict=True):
                self._store(session, assoc, delivery, dataset)
        finally:
            assoc.release()

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
    ) -> None:
        try:
            status = assoc.send_c_store(dataset)
        except Exception as error:
            self._failed(session, delivery, f"C-STORE raised {type(error).__name__}: {error}")
            return
        code = int(status.Status) if status else None
        if code is None or not status_is_success(code):
            shown = "no response (timeout or abort)" if code is None else f"status 0x{code:04X}"
            self._failed(session, delivery, f"C-STORE failed: {shown}")
            return
        delivery.state = DeliveryState.sent
        delivery.sent_at = utcnow()
        delivery.attempts += 1
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

    def _failed(self, session: Session, delivery: Delivery, reason: str) -> None:
        delivery.attempts += 1
        delivery.last_error = reason
        retry_at = next_attempt_at(self.settings, delivery.attempts)
        if retry_at is None:
            delivery.state = DeliveryState.failed
            event = "delivery.dead_lettered"
        else:
            delivery.next_attempt_at = retry_at
            event = "delivery.retry_scheduled"
        session.add(delivery)
        session.commit()
        log.warning(
            event,
            delivery=delivery.id,
            job=delivery.job_id,
            destination=delivery.destination,
            attempts=delivery.attempts,
            reason=reason,
        )

    def _settle_jobs(self, session: Session) -> None:
        """An encoded job is delivered once all its deliveries are sent; failed if any died."""
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
                    reason="a result could not be delivered (dead letter)",
                )
            elif states == {DeliveryState.sent}:
                self.database.transition(session, job, JobState.delivered, expect=JobState.encoded)

    def _seconds_to_next_attempt(self, session: Session) -> float | None:
        upcoming = session.exec(
            select(Delivery.next_attempt_at)
            .where(Delivery.state == DeliveryState.pending)
            .order_by(Delivery.next_attempt_at)  # type: ignore[arg-type]
        ).first()
        return None if upcoming is None else max((upcoming - utcnow()).total_seconds(), 0.0)


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
