"""Receive: the node's DICOM port, C-ECHO / C-STORE SCP (and MPPS, and other stages' services).

An instance is answered Success only once its bytes are durably in the spool, exactly as
the sender encoded them (no transcoding); its file and index row are made before the
answer, or right after it on the association's own thread, before it serves the sender's
next request (see `Intake` and cadnode/ingest/spool.py). The same SOP
Instance UID received twice is stored once. Bad input gets a DIMSE failure status and an
event naming the peer and the reason, never a crashed thread: a dataset that does not decode
or lacks its UIDs 0xC000, one whose SOP class is not the request's 0xA900, a full disk 0xA700.

Who may associate is checked first (cadnode/ingest/admission.py); DICOM TLS is optional. Every read
from a peer has a deadline, so a peer that stalls mid-PDU is cut off without holding
anything else up; garbage on the socket aborts its own association only.

The checks, the durable store and the index are one path (`Intake`), which STOW-RS parts
take too (cadnode/ingest/stow.py).

When an association that stored instances is released (not aborted), and no other live
association is sending the same study, receive records that the sender is done with it:
assemble may then release the study without waiting out its quiet period.
"""

from __future__ import annotations

import functools
import io
import mmap
import os
import socket
import socketserver
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import structlog
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import Verification as VERIFICATION  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationServer, ThreadedAssociationServer

from cadnode.core import audit
from cadnode.core.config import Settings
from cadnode.core.db import AuditOutcome, CompletionSignal, CompletionSource, Database
from cadnode.core.files import is_valid_uid
from cadnode.core.locks import new_keyed_locks
from cadnode.dicom.gatekeeper import Gatekeeper, GateLimits, RefusalHook
from cadnode.dicom.pdu import PduLimits, tune_connection
from cadnode.dicom.services import Service, routed_handlers
from cadnode.dicom.status import (
    CANNOT_UNDERSTAND,
    DIFFERENT_STUDY,
    DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)
from cadnode.ingest.admission import (
    CALLING_AE_NOT_RECOGNISED,
    REJECTED_PERMANENT,
    SERVICE_USER,
    PeerPolicy,
    Refusal,
    server_tls_context,
)
from cadnode.ingest.checks import TooLarge, inflated, pixel_data_problem, undecodable, values_of
from cadnode.ingest.mpps import MppsScp
from cadnode.ingest.negotiation import accept_proposed_storage
from cadnode.ingest.reactor import after_answer, answers_first, request_handler, settle_pending
from cadnode.ingest.spool import (
    HEADER_TAGS,
    Arrival,
    Indexed,
    OutOfSpace,
    Secured,
    Spool,
    cut_short,
)

log = structlog.get_logger("cadnode.ingest.receive")


PREAMBLE = b"\x00" * 128 + b"DICM"
DEFER_SIZE = 64 * 1024
HEADER_UID_TAGS = tuple(Tag(keyword) for keyword in HEADER_TAGS)
# The largest PDU we ask peers to send (pynetdicom's default is 16 KiB; DCMTK sends up to
# 128 KiB): fewer, larger PDUs mean fewer trips through pynetdicom's per-PDU machinery.
MAXIMUM_PDU_SIZE = 4 * 2**20
# With receiver processes sharing the port: how long a process waits per association it
# serves before it accepts again, so that idler processes take the next (see accept_in_turn).
TURN_S = 0.005
TURN_MAX_S = 0.05


class Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class _Sending:
    """What one association has done so far, for its closing event and completion signals."""

    studies: set[str] = field(default_factory=set)
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    failed: int = 0  # answered Success, then not indexed (indexed at the next start)
    closed: bool = False  # its connection has closed (it sends no more)


class Receiver:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        on_indexed: Callable[[], None],
        services: Sequence[Service] = (),
    ):
        self.settings = settings
        self.database = database
        storage = settings.storage
        self.spool = Spool(
            storage.spool, database, int(storage.min_free_mb * 2**20), storage.spool_journal
        )
        self.quarantine = storage.quarantine
        self.scratch = Scratch(storage.spool, settings.limits.max_inflated_bytes)
        # Called when a new job appears or a sender says it is done: assemble looks again.
        self.on_indexed = on_indexed
        self.intake = Intake(self.spool, self.scratch, database, on_indexed)
        self.policy = PeerPolicy(settings.dicom)
        self.tls = server_tls_context(settings.dicom.tls) if settings.dicom.tls else None
        # Other stages' DIMSE services on the same port (the UPS worklist): one AE title for all.
        self.services = [*services, MppsScp(database, on_signal=on_indexed).service()]
        # By association, until it is garbage: its connection may close (EVT_CONN_CLOSE, in
        # pynetdicom's DUL thread) before or after its release is handled (EVT_RELEASED, in
        # its association thread), and either must still see what it sent.
        self._sending: weakref.WeakKeyDictionary[Any, _Sending] = weakref.WeakKeyDictionary()
        self._sending_lock = threading.Lock()
        # While any of its associations sends a study, this process marks it, so a receiver
        # process releasing an association sees the others' (cadnode/port.py).
        self._studies_sent = new_keyed_locks(database, "studies-sent")
        self._server: _Server | None = None

    def reconcile(self) -> dict[str, int]:
        """Make spool and index agree before the first association (see cadnode/ingest/spool.py)."""
        return self.spool.reconcile(self.quarantine)

    def start(
        self,
        listening: socket.socket | None = None,
        observers: Sequence[tuple[Any, Callable[[Any], None]]] = (),
    ) -> int:
        """Start serving in the background; returns the bound port (useful with port 0).

        `listening`: a socket already bound and listening, shared with other receiver
        processes (cadnode/port.py); by default the receiver binds its own.
        `observers`: more handlers of pynetdicom notification events (PDU and DIMSE traffic),
        e.g. benchmarks/ingest_budget.py timing each step of a C-STORE.
        """
        dicom = self.settings.dicom
        ae = AE(ae_title=dicom.ae_title)
        ae.maximum_associations = dicom.max_associations
        ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
        ae.network_timeout = dicom.network_timeout_s
        ae.acse_timeout = dicom.acse_timeout_s
        # Storage SOP classes are added per association, as proposed (_on_requested); other
        # services negotiate as usual.
        ae.add_supported_context(VERIFICATION)
        for service in self.services:
            for sop_class in service.sop_classes:
                ae.add_supported_context(sop_class)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, tune_connection, [self._pdu_limits()]),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            *routed_handlers(self.services),
            *observers,
        ]
        address = (dicom.bind, dicom.port)
        server = cast(
            _Server,
            ae.make_server(
                address,
                ssl_context=self.tls,
                evt_handlers=handlers,
                server_class=_Server,
                listening=listening,
                gate=self._gate_limits(),
                on_refused=self._on_refused_at_gate,
                request_handler=request_handler(dicom.reactor == "events"),
            ),
        )
        accept = server.serve_forever if listening is None else server.accept_in_turn
        threading.Thread(target=accept, name="receive-accept", daemon=True).start()
        self._server = server
        port = int(server.server_address[1])
        log.info(
            "receive.listening",
            ae_title=ae.ae_title,
            bind=dicom.bind,
            port=port,
            tls=bool(self.tls),
            shared=listening is not None,
        )
        return port

    def open_associations(self) -> int:
        """Associations this process serves now (its heartbeat: `cadnode status`)."""
        server = self._server
        return len(server.active_associations) if server is not None else 0

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting, give running associations time to finish, abort the rest."""
        server, self._server = self._server, None
        if server is not None:
            timeout = (
                self.settings.dicom.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
            )
            # Connections that never asked for an association (a port probe) are not waited on.
            running = [a for a in server.stop_accepting() if a.is_established]
            deadline = time.monotonic() + timeout
            for association in running:
                association.join(max(0.0, deadline - time.monotonic()))
            aborted = [a for a in running if a.is_alive()]
            for association in aborted:
                association.abort()
            log.info("receive.stopped", drained=len(running) - len(aborted), aborted=len(aborted))
        self.spool.close()

    def _pdu_limits(self) -> PduLimits:
        dicom = self.settings.dicom
        return PduLimits(dicom.pdu_timeout_s, other_pdu_bytes=dicom.max_request_pdu_kb * 1024)

    def _gate_limits(self) -> GateLimits:
        dicom = self.settings.dicom
        return GateLimits(
            request_timeout_s=dicom.acse_timeout_s,
            max_request_bytes=dicom.max_request_pdu_kb * 1024,
            max_pending_per_address=dicom.max_pending_per_address,
            max_pending=dicom.max_pending,
            max_associations=dicom.max_associations,
        )

    def _on_refused_at_gate(self, address: tuple[Any, ...], calling_ae: str, reason: str) -> None:
        """The gatekeeper refused a request (too long, not a request, too many associations)."""
        audit.record(
            self.database,
            audit.ASSOCIATION,
            actor=calling_ae,
            address=f"{address[0]}:{address[1]}",
            outcome=AuditOutcome.rejected,
            tls=self.tls is not None,
            reason=reason,
        )

    def _on_requested(self, event: Any) -> None:
        """Reject an association request from a peer the configuration does not admit."""
        request = event.assoc.requestor.primitive
        calling_ae = str(request.calling_ae_title).strip()
        try:
            refusal = self.policy.refusal(
                calling_ae, str(request.called_ae_title), str(event.assoc.requestor.address)
            )
        except Exception as error:  # fail closed: pynetdicom would accept after a raise
            refusal = Refusal(CALLING_AE_NOT_RECOGNISED, f"cannot check the peer: {error}")
        if refusal is None:
            # Any storage SOP class, as the bytes are kept as they come (none need be known).
            accept_proposed_storage(event.assoc)
            return
        log.warning(
            "association.refused",
            calling_ae=calling_ae,
            called_ae=str(request.called_ae_title).strip(),
            peer=_peer(event),
            reason=refusal.reason,
        )
        self._audit_association(event, AuditOutcome.rejected, refusal.reason)
        event.assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, refusal.diagnostic)
        event.assoc.kill()  # returns once the A-ASSOCIATE-RJ is out and the peer has gone

    def _on_accepted(self, event: Any) -> None:
        log.info(
            "association.accepted",
            calling_ae=_calling_ae(event),
            peer=_peer(event),
            pid=os.getpid(),  # which receiver process, where there are several
        )
        self._audit_association(event, AuditOutcome.accepted)

    def _on_rejected(self, event: Any) -> None:
        """pynetdicom's own rejections (too many associations, a protocol it does not speak)."""
        log.info("association.rejected", calling_ae=_calling_ae(event), peer=_peer(event))
        self._audit_association(
            event, AuditOutcome.rejected, "refused by the DICOM stack (limit or protocol)"
        )

    def _audit_association(
        self, event: Any, outcome: AuditOutcome, reason: str | None = None
    ) -> None:
        called_ae = str(event.assoc.requestor.primitive.called_ae_title).strip()
        details = {"called_ae": called_ae, **({"reason": reason} if reason else {})}
        audit.record(
            self.database,
            audit.ASSOCIATION,
            actor=_calling_ae(event),
            address=_peer(event),
            outcome=outcome,
            tls=self.tls is not None,
            **details,
        )

    def _on_echo(self, event: Any) -> int:
        log.info("receive.echo", calling_ae=_calling_ae(event))
        return SUCCESS

    def _on_store(self, event: Any) -> int:
        sending = self._sending_of(event.assoc)
        offer, dataset = _offer(event), event.request.DataSet
        if not (self.spool.answers_before_index and answers_first(event.assoc)):
            return self._count(sending, self.intake.take(offer, dataset))
        # The previous instance's file and row, made while this one is flushed.
        earlier = functools.partial(settle_pending, event.assoc)
        unsettled = self.intake.secure(offer, dataset, meanwhile=earlier)
        earlier()  # where the secure did not (a refusal, a duplicate, a large instance)
        if isinstance(unsettled, Taken):
            return self._count(sending, unsettled)
        self._sending_study(sending, unsettled.secured.arrival.study_uid)  # while it is open

        # Durable now: Success goes out while the file and the row are made.
        def settle() -> None:
            self._count(sending, self.intake.settle(unsettled, answered=True))

        after_answer(event.assoc, settle)
        return SUCCESS

    def _count(self, sending: _Sending, taken: Taken) -> int:
        """Count what became of an instance on its association; its status."""
        if taken.arrival is None:
            sending.refused += 1
            return taken.status
        self._sending_study(sending, taken.arrival.study_uid)
        if taken.status != SUCCESS:
            sending.failed += 1
        elif taken.indexed is None:
            sending.duplicates += 1
        else:
            sending.stored += 1
        return taken.status

    def _sending_of(self, association: Any) -> _Sending:
        with self._sending_lock:
            return self._sending.setdefault(association, _Sending())

    def _sending_study(self, sending: _Sending, study_uid: str) -> None:
        with self._sending_lock:
            if study_uid in sending.studies:
                return
            # Closed already: its close has unmarked what it sent, and nothing would again.
            if not sending.closed and study_uid not in self._studies_sending_now(sending):
                self._studies_sent.mark(study_uid)
            sending.studies.add(study_uid)

    def _studies_sending_now(self, besides: _Sending) -> set[str]:
        """Studies the open associations other than `besides` have sent (under the lock)."""
        open_ones = (s for s in self._sending.values() if s is not besides and not s.closed)
        return set().union(*(s.studies for s in open_ones))

    def _on_released(self, event: Any) -> None:
        """The sender is done: studies no other live association is sending (in this process
        or another receiver process) are signalled."""
        with self._sending_lock:
            mine = self._sending.get(event.assoc, _Sending())
            others = self._studies_sending_now(mine)
            elsewhere = {uid for uid in mine.studies if self._studies_sent.marked_elsewhere(uid)}
        done = sorted(mine.studies - others - elsewhere)
        if done:
            with self.database.session() as session:
                session.add_all(
                    CompletionSignal(study_uid=uid, source=CompletionSource.association)
                    for uid in done
                )
                session.commit()
            self.on_indexed()
        _log_closed("association.released", event, mine)

    def _on_aborted(self, event: Any) -> None:
        with self._sending_lock:
            mine = self._sending.get(event.assoc, _Sending())
        _log_closed("association.aborted", event, mine)

    def _on_closed(self, event: Any) -> None:
        with self._sending_lock:
            mine = self._sending.get(event.assoc)
            if mine is None or mine.closed:
                return
            mine.closed = True
            for study_uid in mine.studies - self._studies_sending_now(mine):
                self._studies_sent.unmark(study_uid)


class _Server(ThreadedAssociationServer):
    """pynetdicom's server, behind a gatekeeper (cadnode/dicom/gatekeeper.py).

    An accepted connection waits, with no thread of its own, until its whole association
    request has arrived within its deadline (the TLS handshake too); only then does
    pynetdicom take it, and only while fewer than the maximum number of associations run.
    Every later read has a per-PDU deadline and length limit (cadnode/dicom/pdu.py).

    Given a `listening` socket, it accepts on that one instead of binding its own: several
    receiver processes then take turns on one port (`accept_in_turn`).
    """

    def __init__(
        self,
        *args: Any,
        gate: GateLimits,
        on_refused: RefusalHook,
        listening: socket.socket | None = None,
        **kwargs: Any,
    ) -> None:
        self._listening = listening
        self._closing = False
        self._requests: dict[socket.socket, bytes] = {}
        super().__init__(*args, **kwargs)
        self.gatekeeper = Gatekeeper(
            gate,
            hand_over=self._hand_over,
            running=lambda: len(self.active_associations),
            on_refused=on_refused,
            ssl_context=self.ssl_context,
        )

    def accept_in_turn(self) -> None:
        """Accept on the shared socket with a blocking accept(), not serve_forever's select():
        the kernel then hands each connection to one process waiting in accept(), the one
        that has waited longest. (After a select() every process wakes, and the one already
        running, the busiest, wins.) A process serving associations comes back to accept()
        a little later the more it serves, so a burst of connections is spread over the
        idle receivers rather than taken by the first one woken."""
        while not self._closing:
            try:
                request, address = self.get_request()
            except OSError:
                if not self._closing:  # not listening yet (the node listens once every
                    time.sleep(0.05)  # receiver is up), out of descriptors: try again soon
                continue
            if self._closing:  # it came while this process was stopping: not ours to serve
                self.shutdown_request(request)
                break
            self.process_request(request, address)
            time.sleep(min(TURN_MAX_S, TURN_S * len(self.active_associations)))

    def process_request(self, request: Any, client_address: Any) -> None:
        self.gatekeeper.admit(request, client_address)

    def _hand_over(self, sock: socket.socket, address: Any, request: bytes) -> None:
        """A whole association request: pynetdicom's association takes it from here (in the
        gatekeeper's thread: creating the association is quick, and it runs in its own)."""
        sock.settimeout(self.ae.network_timeout)
        self._requests[sock] = request
        try:
            self.finish_request(sock, address)
        finally:
            self._requests.pop(sock, None)

    def received_before(self, sock: socket.socket) -> bytes:
        """The association request the gatekeeper read from `sock` (cadnode/dicom/pdu.py)."""
        return self._requests.pop(sock, b"")

    def server_bind(self) -> None:
        if self._listening is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()  # the unbound one socketserver made
        self.socket = self._listening
        self.socket.setblocking(True)  # see accept_in_turn
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._listening is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: the gatekeeper does the TLS handshake, off the accept loop."""
        assert self.socket is not None
        return self.socket.accept()

    def stop_accepting(self) -> list[Any]:
        """Close the listening socket (new peers are refused) and every connection still
        waiting to associate; the running associations."""
        if self._listening is not None:
            self._closing = True
            # This process's copy only (a shutdown() would stop every receiver's). An accept()
            # already waiting may still take one connection: accept_in_turn closes it.
            self._listening.close()
        else:
            socketserver.BaseServer.shutdown(self)  # ends serve_forever
            AssociationServer.server_close(self)  # pynetdicom's close, without waiting on them
        self.gatekeeper.close()
        return list(self.active_associations)


@dataclass(frozen=True)
class Offer:
    """One instance as a sender offers it, before its dataset is read: by C-STORE, or as a
    STOW-RS part (cadnode/ingest/stow.py)."""

    sop_class_uid: str  # what the request (or the part's File Meta Information) says
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    peer: str
    said_by: str = "the C-STORE request"  # for the refusal's reason
    study_uid: str | None = None  # STOW-RS to /studies/{study}: the study it must be of


@dataclass(frozen=True)
class Taken:
    """What became of an offered instance: stored (`indexed`), a duplicate, or refused."""

    status: int
    arrival: Arrival | None = None  # None: refused, `status` and `reason` say why
    indexed: Indexed | None = None  # None with an arrival: stored before (a duplicate)
    reason: str = ""


@dataclass
class Unsettled:
    """An offered instance checked and its bytes durable (`Intake.secure`), its file and
    index row still to be made (`Intake.settle`); holds its buffer and its lock till then."""

    offer: Offer
    secured: Secured
    held: ExitStack


class Intake:
    """An offered instance checked, made durable, indexed and audited: the one path of
    C-STORE and STOW-RS. `take` answers once the bytes are durable and the row committed;
    C-STORE on the event-driven reactor answers once the bytes are durable (`secure`) and
    makes the file and the row after the answer (`settle`), where the spool allows it."""

    def __init__(
        self, spool: Spool, scratch: Scratch, database: Database, on_indexed: Callable[[], None]
    ) -> None:
        self.spool = spool
        self.scratch = scratch
        self.database = database
        self.on_indexed = on_indexed

    def take(self, offer: Offer, dataset: BinaryIO) -> Taken:
        """`dataset`: its bytes as they came, from offset 0 (in memory, or a scratch file)."""
        secured = self.secure(offer, dataset)
        return secured if isinstance(secured, Taken) else self.settle(secured)

    def secure(
        self, offer: Offer, dataset: BinaryIO, meanwhile: Callable[[], None] | None = None
    ) -> Unsettled | Taken:
        """Check an instance and make its bytes durable; a refusal's `Taken`, or what
        `settle` finishes (it must follow: the instance's lock is held till then).
        `meanwhile`: see `Spool.secure`."""
        with ExitStack() as held:
            try:
                meta = _file_meta(offer)
                buffer = held.enter_context(_buffer_of(dataset))
                arrival = _read_arrival(offer, dataset, buffer, self.scratch)
                secured = self.spool.secure(arrival, [meta, buffer], held, meanwhile)
            except Exception as error:
                return self._refused(offer, error)
            return Unsettled(offer, secured, held.pop_all())

    def settle(self, unsettled: Unsettled, answered: bool = False) -> Taken:
        """Make a secured instance's file and row, log and audit it. `answered`: its sender
        has had Success already, so a failure here is the node's to report, not a refusal
        (its bytes are in the journal or in place, indexed at the next start)."""
        offer, arrival = unsettled.offer, unsettled.secured.arrival
        with unsettled.held:
            try:
                indexed = self.spool.settle(unsettled.secured)
            except Exception as error:
                if not answered:
                    return self._refused(offer, error)
                log.exception("instance.not_settled", calling_ae=offer.calling_ae, peer=offer.peer)
                return Taken(PROCESSING_FAILURE, arrival, reason="the node could not index it")
        if indexed is None:
            log.info("instance.duplicate", calling_ae=offer.calling_ae)
            return Taken(SUCCESS, arrival)
        log.info(
            "instance.received",
            job=indexed.job_id,
            study=indexed.study_id,
            version=indexed.version,
            instances=indexed.instance_count,
            calling_ae=offer.calling_ae,
        )
        if indexed.opened_job:
            if indexed.version == 1:  # the study's first instance: who sent whose study
                audit.study_received(
                    self.database,
                    self.spool.folder / arrival.relative_path,
                    study_uid=arrival.study_uid,
                    calling_ae=offer.calling_ae,
                    peer=offer.peer,
                )
            self.on_indexed()
        return Taken(SUCCESS, arrival, indexed)

    def _refused(self, offer: Offer, error: Exception) -> Taken:
        """The answer to an instance that could not be secured, or settled before its
        answer (called in the `except` block: a failure of ours is logged with its trace)."""
        calling_ae, peer = offer.calling_ae, offer.peer
        if isinstance(error, Rejected):
            return self.refuse(calling_ae, peer, error.status, error.reason)
        if isinstance(error, (OutOfSpace, OSError)):  # ENOSPC, EIO: the disk, not the sender
            return self.refuse(calling_ae, peer, OUT_OF_RESOURCES, str(error))
        # Our fault, not the sender's: say so, keep the association and the thread alive.
        log.exception("instance.not_stored", calling_ae=calling_ae, peer=peer)
        return Taken(PROCESSING_FAILURE, reason="the node could not store it")

    def refuse(self, calling_ae: str, peer: str, status: int, reason: str) -> Taken:
        """An instance refused, here or before it could be offered (a bad STOW-RS part)."""
        log.warning(
            "instance.rejected", calling_ae=calling_ae, peer=peer, status=hex(status), reason=reason
        )
        audit.record(
            self.database,
            audit.INSTANCE_REFUSED,
            actor=calling_ae,
            address=peer,
            outcome=AuditOutcome.refused,
            status=hex(status),
            reason=reason,
        )
        return Taken(status, reason=reason)


def _offer(event: Any) -> Offer:
    request = event.request
    return Offer(
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        transfer_syntax=str(event.context.transfer_syntax),
        calling_ae=_calling_ae(event),
        called_ae=str(event.assoc.requestor.primitive.called_ae_title).strip(),
        peer=_peer(event),
    )


@contextmanager
def _buffer_of(dataset: BinaryIO) -> Iterator[memoryview]:
    """The dataset's bytes without a copy: a received one's buffer, a file's mapping."""
    if isinstance(dataset, io.BytesIO):
        with dataset.getbuffer() as buffer:
            yield buffer
        return
    if os.fstat(dataset.fileno()).st_size == 0:  # nothing to map
        yield memoryview(b"")
        return
    with (
        mmap.mmap(dataset.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        memoryview(mapped) as buffer,
    ):
        yield buffer


def _file_meta(offer: Offer) -> bytes:
    uid = offer.sop_instance_uid
    if not is_valid_uid(uid):
        raise Rejected(CANNOT_UNDERSTAND, f"invalid SOP Instance UID in {offer.said_by}")
    return file_meta(offer.sop_class_uid, uid, offer.transfer_syntax, offer.calling_ae)


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, calling_ae: str
) -> bytes:
    """Preamble, prefix and File Meta Information for a dataset as it came, from `calling_ae`."""
    length = len(sop_instance_uid)
    before, after = file_meta_around_uid(sop_class_uid, transfer_syntax, calling_ae, length)
    return before + sop_instance_uid.encode() + b"\0" * (length % 2) + after  # UI: NUL-padded


# (0002,0003) Media Storage SOP Instance UID's element header, Explicit VR Little Endian.
_INSTANCE_UID_HEADER = b"\x02\x00\x03\x00UI"


@functools.lru_cache(maxsize=1024)
def file_meta_around_uid(
    sop_class_uid: str, transfer_syntax: str, calling_ae: str, uid_length: int
) -> tuple[bytes, bytes]:
    """Preamble and File Meta Information before and after the SOP Instance UID's value.

    Instances alike in SOP class, transfer syntax, sender and UID length differ only in that
    value, so pydicom encodes their File Meta Information once; encoding it afresh for each
    instance cost about 0.5 ms of the receive path's CPU.
    """
    meta = create_file_meta(
        sop_class_uid=UID(sop_class_uid),
        sop_instance_uid=UID("1" * uid_length),  # a stand-in of the same length
        transfer_syntax=UID(transfer_syntax),
    )
    meta.SourceApplicationEntityTitle = calling_ae  # who sent it, kept with the file
    encoded = PREAMBLE + encode_file_meta(meta)
    start = encoded.index(_INSTANCE_UID_HEADER) + len(_INSTANCE_UID_HEADER) + 2  # 2: length
    return encoded[:start], encoded[start + uid_length + uid_length % 2 :]


def _read_arrival(offer: Offer, dataset: BinaryIO, buffer: memoryview, scratch: Scratch) -> Arrival:
    """Decode the whole dataset's structure (not its pixels) and check its identity."""
    try:
        header = _decode(dataset, buffer, UID(offer.transfer_syntax), scratch)
        values = values_of(header, HEADER_UID_TAGS)
        uids = {name: str(value or "") for name, value in zip(HEADER_TAGS, values, strict=True)}
    except TooLarge as error:
        raise Rejected(OUT_OF_RESOURCES, f"dataset {error}") from error
    except Rejected:
        raise
    except Exception as error:  # pydicom raises many kinds on a malformed stream
        raise Rejected(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {error}") from error
    bad = [tag for tag, value in uids.items() if not is_valid_uid(value)]
    if bad:
        raise Rejected(CANNOT_UNDERSTAND, f"missing or invalid UID: {', '.join(bad)}")
    if uids["SOPClassUID"] != offer.sop_class_uid:
        raise Rejected(
            DOES_NOT_MATCH_SOP_CLASS, f"SOP Class UID of the dataset differs from {offer.said_by}"
        )
    if uids["SOPInstanceUID"] != offer.sop_instance_uid:
        raise Rejected(
            CANNOT_UNDERSTAND, f"SOP Instance UID of the dataset differs from {offer.said_by}"
        )
    if offer.study_uid is not None and uids["StudyInstanceUID"] != offer.study_uid:
        raise Rejected(DIFFERENT_STUDY, "Study Instance UID is not the one the request names")
    return Arrival(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax=offer.transfer_syntax,
        calling_ae=offer.calling_ae,
        called_ae=offer.called_ae,
        peer=offer.peer,
    )


@dataclass(frozen=True)
class Scratch:
    """Where a deflated dataset is inflated to be checked, and how large it may grow."""

    folder: Path
    max_inflated_bytes: int


def _decode(
    dataset: BinaryIO, buffer: memoryview, transfer_syntax: UID, scratch: Scratch
) -> Dataset:
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        return _checked(dataset, transfer_syntax, len(buffer))
    with inflated(buffer, scratch.max_inflated_bytes, scratch.folder) as stream:
        return _checked(stream, transfer_syntax, os.fstat(stream.fileno()).st_size)


def _checked(stream: BinaryIO, transfer_syntax: UID, size: int) -> Dataset:
    """The dataset's elements, large values skipped over (not copied); ValueError naming
    what does not decode, or Rejected for an image whose Pixel Data does not fit it."""
    stream.seek(0)
    decoded = read_dataset(
        stream,
        is_implicit_VR=transfer_syntax.is_implicit_VR,
        is_little_endian=transfer_syntax.is_little_endian,
        defer_size=DEFER_SIZE,  # large values (pixels) are skipped over, not copied
    )
    if stream.tell() > size:
        raise ValueError("a value runs past the end of the dataset")
    problem = cut_short(decoded) or undecodable(decoded)
    if problem:
        raise ValueError(problem)
    problem = pixel_data_problem(decoded, transfer_syntax)
    if problem:
        raise Rejected(CANNOT_UNDERSTAND, problem)
    return decoded


def _calling_ae(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _peer(event: Any) -> str:
    return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"


def _log_closed(name: str, event: Any, sending: _Sending) -> None:
    log.info(
        name,
        calling_ae=_calling_ae(event),
        peer=_peer(event),
        stored=sending.stored,
        duplicates=sending.duplicates,
        refused=sending.refused,
        failed=sending.failed,
    )
