"""Dispatch: the outbox. C-STORE every result object to every destination, exactly once.

Each (object, destination) pair is a Delivery row (queued by route and encode through
cadnode/deliver/outbox.py): pending until the peer acknowledges it, then sent. The row names
its destination (`destinations.NAME`); the address and options are the configuration's. A
failed attempt is retried with exponential back-off (the next attempt time is in the
database, so a restart resumes the schedule); after the configured number of attempts the
delivery is dead-lettered and its job failed (`FailureKind.dead_letter`, with the reason in
words). Original images that a routing rule forwards go through the same outbox. An admin
replays or discards dead letters with `cadnode deliveries` (cadnode/deliver/outbox_admin.py);
destinations with `storage_commitment` are then asked to confirm they keep each object
(cadnode/deliver/commitment.py). A destination given by `url` (a DICOMweb service) gets
the same outbox by STOW-RS instead of C-STORE (cadnode/deliver/stow.py).

Nothing one delivery does stalls the others: whatever goes wrong with it (its file missing
or unreadable, its destination gone from the configuration, refused, unreachable, an error
nobody foresaw) is recorded on that row with its reason, and the pass goes on. A file that
is gone, or a destination no longer configured, is a dead letter at once: no retry brings
either back.

Objects are sent from their files as stored: the file meta gives the SOP class and transfer
syntax of the presentation context, and pynetdicom streams the dataset's bytes in PDUs of the
peer's size, never decoding it (a peer that accepts only another uncompressed syntax gets the
object decoded and converted, whole, as before).

Exactly once, as far as a network allows: a delivery is recorded `sent` in its own commit
the moment the peer's C-STORE response says Success, before the next object goes, and is
never sent again after that commit. Two windows remain, both at-least-once, never lost: a
crash between the response and that commit (milliseconds), and a response that never comes
(timeout, abort) for an object the peer did keep. Either way the same object is sent again
with the same SOP Instance UID, which a PACS stores once (it replaces or ignores the copy).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom import Dataset, dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from sqlmodel import Session, col, select

from cadnode.core import audit
from cadnode.core.claims import worker_for
from cadnode.core.config import AnyDestination, Destination, DispatchSettings, StowDestination
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
from cadnode.core.locks import named_lock
from cadnode.deliver import stow
from cadnode.deliver.commitment import STORAGE_COMMITMENT, Commitments, CommitmentScp
from cadnode.deliver.outbox import record_dead_letter, record_failure, record_sent
from cadnode.deliver.stow import StowObject
from cadnode.dicom.pdu import tune_connection
from cadnode.dicom.status import status_is_success

log = structlog.get_logger("cadnode.deliver.dispatch")

# send_c_store given a file path streams the stored bytes instead of decoding the object
# (pynetdicom's switch; dispatch is the node's only caller that passes a path).
_config.STORE_SEND_CHUNKED_DATASET = True

# A job failed by a dead letter, in words (the kind is FailureKind.dead_letter).
DEAD_LETTER = "a result could not be delivered (dead letter)"
NOT_ESTABLISHED = "association not established (refused, rejected or unreachable)"
# Deliveries claimed in one pass: a few associations' worth, leaving the rest to others.
CLAIM_BATCH = 512

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# An association holds 128 presentation contexts; one is kept for Storage Commitment.
MAX_STORE_CONTEXTS = 127

Context = tuple[str, str]  # (SOP class, transfer syntax): one proposed presentation context


@dataclass(frozen=True)
class _Outgoing:
    """A pending delivery, its file, and what the file meta says of the object in it."""

    delivery: Delivery
    kind: str  # "result" (under results/) or "received" (a forwarded original, under spool/)
    path: Path
    relative: str  # its path under that folder, as an admin is shown it
    sop_class: str
    transfer_syntax: str

    def contexts(self) -> list[Context]:
        """Its own syntax first, each syntax a context of its own so that the peer can take
        exactly the stored one; an uncompressed object also offers the other little endian."""
        others = [s for s in UNCOMPRESSED if s != self.transfer_syntax]
        converted = others if self.transfer_syntax in UNCOMPRESSED else []
        return [(self.sop_class, syntax) for syntax in [self.transfer_syntax, *converted]]


class _Unsendable(Exception):
    """This object cannot go now: `final` when no retry can help (its file is gone)."""

    def __init__(self, reason: str, detail: str, *, final: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.detail, self.final = reason, detail, final


class Dispatcher:
    name = "dispatch"

    def __init__(
        self,
        database: Database,
        results: Path,
        settings: DispatchSettings,
        calling_ae: str,
        spool: Path | None = None,
        destinations: Mapping[str, AnyDestination] | None = None,
    ) -> None:
        self.database = database
        self.results = results
        self.spool = spool  # where originals that rules forward are read from
        self.settings = settings
        self.calling_ae = calling_ae
        # The configured destinations by name, the name being what each Delivery row holds.
        self.destinations = dict(destinations or {})
        self.commitments = Commitments(settings, self.destinations)
        # A commitment answer may come on dispatch's own association, while it is still open.
        self.commitment_reports = CommitmentScp(database)
        self.worker = worker_for(database)

    def advance(self) -> float | None:
        with self.database.session() as session:
            # Claimed before sending (cadnode/core/claims.py): no two dispatchers, on this node
            # or another, send the same delivery.
            due = self.worker.claim(
                session,
                Delivery,
                col(Delivery.state) == DeliveryState.pending,
                col(Delivery.next_attempt_at) <= utcnow(),
                limit=CLAIM_BATCH,
            )
            by_destination: dict[str, list[Delivery]] = defaultdict(list)
            for delivery in due:
                by_destination[delivery.destination].append(delivery)
            for name, deliveries in by_destination.items():
                self._send(session, name, deliveries)
            # Any this pass claimed and left (discarded meanwhile, a batch cut short): freed.
            left = [d.id for d in due if self.worker.holds(Delivery, d.id)]
            self.worker.release(session, Delivery, left)
            with named_lock(self.database, "commitment-requests").if_free() as mine:
                for name, transactions in self.commitments.due(session).items() if mine else ():
                    self._ask_again(session, name, transactions)  # by one process at a time
            self._settle_jobs(session)
            delays = [
                self._seconds_to_next_attempt(session),
                self.commitments.seconds_to_next(session),
            ]
            return min((d for d in delays if d is not None), default=None)

    def _send(self, session: Session, name: str, deliveries: list[Delivery]) -> None:
        destination = self.destinations.get(name)
        if destination is None:
            for delivery in deliveries:
                reason = f"destination {name!r} is no longer configured"
                self._failed(session, delivery, reason, final=True)
            return
        outgoing = [item for d in deliveries if (item := self._prepare(session, d)) is not None]
        if isinstance(destination, StowDestination):
            self._send_stow(session, destination, outgoing)
            return
        limit = MAX_STORE_CONTEXTS - (1 if self.commitments.wanted(name) else 0)
        for batch in _batches(outgoing, limit):
            self._send_batch(session, name, destination, batch)

    def _prepare(self, session: Session, delivery: Delivery) -> _Outgoing | None:
        """The delivery's file and the header its presentation context needs; None once a
        failure is recorded for it instead."""
        try:
            return self._outgoing(session, delivery)
        except _Unsendable as problem:
            self._failed(session, delivery, problem.reason, problem.detail, final=problem.final)
        except Exception as error:  # anything else about this one object fails it alone
            session.rollback()
            raised = f"reading the object raised {type(error).__name__}"
            self._failed(session, delivery, raised, str(error))
        return None

    def _outgoing(self, session: Session, delivery: Delivery) -> _Outgoing:
        kind, folder, relative = self._file_of(session, delivery.object_uid)
        meta = _file_meta(folder / relative, kind, relative)
        if meta["MediaStorageSOPInstanceUID"] != delivery.object_uid:
            raise _Unsendable(f"{kind} file holds another object", relative)
        return _Outgoing(
            delivery=delivery,
            kind=kind,
            path=folder / relative,
            relative=relative,
            sop_class=meta["MediaStorageSOPClassUID"],
            transfer_syntax=meta["TransferSyntaxUID"],
        )

    def _file_of(self, session: Session, uid: str) -> tuple[str, Path, str]:
        """(what it is, its folder, its path there): a result cadnode made, or an original
        image a rule forwards as it was received."""
        made = session.get(ResultObject, uid)
        if made is not None:
            return "result", self.results, made.path
        original = session.get(Instance, uid)
        if original is not None and self.spool is not None:
            return "received", self.spool, original.path
        raise _Unsendable("neither a result nor a received instance", uid, final=True)

    def _send_stow(
        self, session: Session, destination: StowDestination, outgoing: list[_Outgoing]
    ) -> None:
        """By STOW-RS (cadnode/deliver/stow.py): each delivery recorded as its request's
        answer comes, sent only if the answer names its object as stored."""
        items = {item.delivery.id: item for item in outgoing}
        objects = [
            StowObject(key, item.delivery.object_uid, item.path)
            for key, item in items.items()
            if key is not None
        ]
        for outcome in stow.send_all(destination, objects):
            item = items[outcome.key]
            session.refresh(item.delivery)  # an admin may have discarded it meanwhile
            if not self._still_mine(item.delivery):
                continue
            if not outcome.stored:
                self._failed(
                    session, item.delivery, outcome.reason, outcome.detail, final=outcome.final
                )
                continue
            record_sent(item.delivery)
            item.delivery.last_error = outcome.warning  # a 202's warning, kept on the sent row
            if not self.worker.settle(session, item.delivery):
                continue  # its lease ran out meanwhile: whoever took it sends it again
            self._sent(item.delivery, destination, item, outcome.status)

    def _send_batch(
        self, session: Session, name: str, destination: Destination, batch: list[_Outgoing]
    ) -> None:
        """One association for `batch`. An error nobody foresaw fails the deliveries it left
        untried, with its reason, and the pass goes on."""
        tried: set[int | None] = set()
        try:
            self._store_batch(session, name, destination, batch, tried)
        except Exception as error:
            session.rollback()
            log.warning("dispatch.batch_failed", destination=name, error=type(error).__name__)
            for item in batch:
                session.refresh(item.delivery)
                untried = item.delivery.id not in tried
                if untried and item.delivery.state is DeliveryState.pending:
                    raised = f"sending raised {type(error).__name__}"
                    self._failed(session, item.delivery, raised, str(error))

    def _store_batch(
        self,
        session: Session,
        name: str,
        destination: Destination,
        batch: list[_Outgoing],
        tried: set[int | None],
    ) -> None:
        commit = self.commitments.wanted(name)
        contexts = _contexts(batch)
        if commit:
            contexts.append((STORAGE_COMMITMENT, list(UNCOMPRESSED)))
        assoc = self._associate(destination, contexts)
        if not assoc.is_established:
            for item in batch:
                tried.add(item.delivery.id)
                self._failed(session, item.delivery, NOT_ESTABLISHED)
            return
        try:
            sent = []
            for item in batch:
                tried.add(item.delivery.id)
                if self._store(session, assoc, destination, item):
                    sent.append(item)
            if commit and sent:
                sop_classes = {item.delivery.object_uid: item.sop_class for item in sent}
                deliveries = [item.delivery for item in sent]
                self.commitments.request(session, assoc, deliveries, sop_classes)
        finally:
            assoc.release()

    def _ask_again(self, session: Session, name: str, transactions: list[list[Delivery]]) -> None:
        """Storage Commitment requests that got no answer (or were never made), made again."""
        destination = self.destinations[name]  # only configured destinations are asked
        if not isinstance(destination, Destination):  # nor is a DICOMweb one ever (no DIMSE)
            return
        try:
            assoc = self._associate(destination, [(STORAGE_COMMITMENT, list(UNCOMPRESSED))])
        except Exception as error:  # a bad address: counts as a request, like a refusal
            session.rollback()
            for deliveries in transactions:
                self.commitments.request_failed(session, deliveries, type(error).__name__)
            return
        try:
            for deliveries in transactions:
                if not assoc.is_established:  # counts as a request; asked again after the timeout
                    self.commitments.request_failed(session, deliveries, NOT_ESTABLISHED)
                    continue
                self._ask_for(session, assoc, deliveries)
        finally:
            if assoc.is_established:
                assoc.release()

    def _ask_for(self, session: Session, assoc: Association, deliveries: list[Delivery]) -> None:
        try:
            sop_classes = {d.object_uid: self._sop_class_of(session, d) for d in deliveries}
        except _Unsendable as problem:  # its file is gone: nothing left to ask about
            self.commitments.fail(session, deliveries, problem.reason, problem.detail)
            return
        self.commitments.request(session, assoc, deliveries, sop_classes)

    def _sop_class_of(self, session: Session, delivery: Delivery) -> str:
        kind, folder, relative = self._file_of(session, delivery.object_uid)
        return _file_meta(folder / relative, kind, relative)["MediaStorageSOPClassUID"]

    def _associate(
        self, destination: Destination, contexts: list[tuple[str, list[str]]]
    ) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
        return ae.associate(
            destination.host,  # an IPv4 or IPv6 address, or a name resolved here
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, tune_connection),
                (evt.EVT_N_EVENT_REPORT, self.commitment_reports.on_event_report),
            ],
        )

    def _store(
        self, session: Session, assoc: Association, destination: Destination, item: _Outgoing
    ) -> bool:
        """C-STORE one object; True once the peer has it and that is committed."""
        delivery = item.delivery
        session.refresh(delivery)  # an admin may have discarded it while earlier ones went
        if not self._still_mine(delivery):
            return False
        try:
            status = assoc.send_c_store(_payload(assoc, item))
        except FileNotFoundError:  # removed since its header was read
            self._failed(session, delivery, f"{item.kind} file missing", item.relative, final=True)
            return False
        except Exception as error:
            reason = f"C-STORE raised {type(error).__name__}"
            self._failed(session, delivery, reason, str(error))
            return False
        code = int(status.Status) if status and "Status" in status else None
        if code is None or not status_is_success(code):
            shown = "no response (timeout or abort)" if code is None else f"status 0x{code:04X}"
            self._failed(session, delivery, f"C-STORE failed: {shown}")
            return False
        # The peer has it: record that before anything else (the window in the module's doc).
        record_sent(delivery)
        if not self.worker.settle(session, delivery):
            return False  # its lease ran out meanwhile: whoever took it sends it again
        self._sent(delivery, destination, item, f"0x{code:04X}")
        return True

    def _sent(
        self, delivery: Delivery, destination: AnyDestination, item: _Outgoing, status: str
    ) -> None:
        log.info(
            "delivery.sent",
            delivery=delivery.id,
            job=delivery.job_id,
            destination=delivery.destination,
            attempts=delivery.attempts,
            status=status,
        )
        audit.record(
            self.database,
            audit.RESULT_DELIVERED,
            actor=self.calling_ae,
            address=str(destination),
            outcome=AuditOutcome.sent,
            delivery=delivery.id,
            job=delivery.job_id,
            destination=delivery.destination,
            object_uid=delivery.object_uid,
            sop_class_uid=item.sop_class,
            status=status,
            attempts=delivery.attempts,
        )

    def _failed(
        self,
        session: Session,
        delivery: Delivery,
        reason: str,
        detail: str = "",
        *,
        final: bool = False,
    ) -> None:
        """Record a failed try: retried after the back-off, dead at its limit, or at once when
        `final`. The row keeps `reason: detail`; the log only `reason`, as `detail` may name
        files or carry a library's words, whose paths hold a study's UIDs."""
        stored = f"{reason}: {detail}" if detail else reason
        if final:
            record_dead_letter(delivery, stored)
            dead = True
        else:
            dead = record_failure(delivery, stored, self.settings.backoff)
        self.worker.settle(session, delivery)  # and free it for whoever tries next
        log.warning(
            "delivery.dead_lettered" if dead else "delivery.retry_scheduled",
            delivery=delivery.id,
            job=delivery.job_id,
            destination=delivery.destination,
            attempts=delivery.attempts,
            reason=reason,
        )

    def _still_mine(self, delivery: Delivery) -> bool:
        """Pending and claimed by this worker: an admin may have discarded it, or another
        worker taken it over after this one's lease ran out."""
        return (
            delivery.state is DeliveryState.pending
            and delivery.claimed_by == self.worker.identity
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


def _file_meta(path: Path, kind: str, relative: str) -> dict[str, str]:
    """The file meta's SOP class, instance and transfer syntax: group 0002 only, never the
    dataset behind it."""
    try:
        meta = read_file_meta_info(path)
    except FileNotFoundError as error:
        raise _Unsendable(f"{kind} file missing", relative, final=True) from error
    except Exception as error:
        raise _Unsendable(f"{kind} file unreadable", f"{relative}: {error}") from error
    wanted = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    lacking = [keyword for keyword in wanted if keyword not in meta]
    if lacking:
        raise _Unsendable(f"{kind} file unreadable", f"{relative}: no {', '.join(lacking)}")
    return {keyword: str(meta[keyword].value) for keyword in wanted}


def _payload(assoc: Association, item: _Outgoing) -> Path | Dataset:
    """The file itself when the peer took its transfer syntax (streamed as stored), else the
    object decoded, for pynetdicom to convert to the uncompressed syntax the peer took."""
    for context in assoc.accepted_contexts:
        if (context.abstract_syntax, context.transfer_syntax[0]) == (
            item.sop_class,
            item.transfer_syntax,
        ):
            return item.path
    return dcmread(item.path)


def _contexts(batch: Sequence[_Outgoing]) -> list[tuple[str, list[str]]]:
    wanted = dict.fromkeys(context for item in batch for context in item.contexts())
    return [(sop_class, [syntax]) for sop_class, syntax in wanted]


def _batches(items: Sequence[_Outgoing], limit: int) -> Iterator[list[_Outgoing]]:
    """`items` in order, in batches whose presentation contexts fit one association."""
    batch: list[_Outgoing] = []
    contexts: set[Context] = set()
    for item in items:
        wanted = set(item.contexts())
        if batch and len(contexts | wanted) > limit:
            yield batch
            batch, contexts = [], set()
        batch.append(item)
        contexts |= wanted
    if batch:
        yield batch
