"""Serve: a Query/Retrieve SCP over everything cadnode holds, so a PACS or viewer can pull it.

    PACS --C-FIND--> query.py   (study, series, image level; study root and patient root)
         --C-MOVE--> retrieve.py --C-STORE--> a configured destination
         --C-GET---> retrieve.py --C-STORE--> the same association

What is held: the received images (the spool) and cadnode's own result objects (SR, SEG),
through the query index (index.py), which assemble and encode fill as objects become held.
Served on the node's DICOM port and AE title: receive binds these handlers beside C-STORE
and the UPS worklist's, routing each request by the SOP class of its presentation context
(cadnode.dicom.pdu.Service), so Q/R's C-FIND and UPS's never meet. A C-MOVE goes only to
an AE title configured under `destinations`; any other is answered 0xA801 (move destination
unknown). Events: `query.find`, `retrieve.move`, `retrieve.get`, with counts and AE titles,
never patient identifiers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import structlog
from pydicom import Dataset
from pynetdicom import build_context, evt
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT_FIND  # type: ignore[attr-defined]
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet as PATIENT_ROOT_GET  # type: ignore[attr-defined]
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelMove as PATIENT_ROOT_MOVE  # type: ignore[attr-defined]
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT_FIND  # type: ignore[attr-defined]
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_ROOT_GET  # type: ignore[attr-defined]
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as STUDY_ROOT_MOVE  # type: ignore[attr-defined]
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cadnode.core import audit
from cadnode.core.config import Destination, Settings
from cadnode.core.db import AuditOutcome, Database
from cadnode.dicom.services import Service
from cadnode.dicom.status import (
    CANCEL,
    CANNOT_UNDERSTAND,
    PENDING,
    PENDING_UNSUPPORTED_KEYS,
)
from cadnode.serve.index import Held, QueryIndex
from cadnode.serve.query import (
    PATIENT_ROOT,
    STUDY_ROOT,
    Model,
    Refused,
    Request,
    checked,
    find,
)
from cadnode.serve.retrieve import (
    Tally,
    accepted_by,
    proposed_contexts,
    sendable,
    sub_association_handlers,
)

log = structlog.get_logger("cadnode.serve")

VERIFICATION_CONTEXT = build_context(Verification)
# The Query/Retrieve Information Model SOP classes (PS3.4 C.6).
MODELS = {
    STUDY_ROOT_FIND: STUDY_ROOT,
    STUDY_ROOT_MOVE: STUDY_ROOT,
    STUDY_ROOT_GET: STUDY_ROOT,
    PATIENT_ROOT_FIND: PATIENT_ROOT,
    PATIENT_ROOT_MOVE: PATIENT_ROOT,
    PATIENT_ROOT_GET: PATIENT_ROOT,
}


class QueryRetrieveScp:
    def __init__(
        self, settings: Settings, database: Database, index: QueryIndex | None = None
    ) -> None:
        storage = settings.storage
        self.database = database
        self.index = index or QueryIndex(database, storage.spool, storage.results)
        self.ae_title = settings.dicom.ae_title
        # A compressed object is decompressed for a peer that takes it no other way only
        # within this (cadnode.dicom.pixels): a C-GET must not make the node decode a bomb.
        self.max_decoded_bytes = settings.limits.max_decoded_image_bytes
        self.destinations: Mapping[str, Destination] = {
            d.ae_title: d for d in settings.dicom_destinations().values()
        }

    @property
    def services(self) -> list[Service]:
        return [
            Service(
                name="query",
                sop_classes=(STUDY_ROOT_FIND, PATIENT_ROOT_FIND),
                handlers={evt.EVT_C_FIND: self.on_find},
            ),
            Service(
                name="move",
                sop_classes=(STUDY_ROOT_MOVE, PATIENT_ROOT_MOVE),
                handlers={evt.EVT_C_MOVE: self.on_move},
            ),
            Service(
                name="get",
                sop_classes=(STUDY_ROOT_GET, PATIENT_ROOT_GET),
                handlers={evt.EVT_C_GET: self.on_get},
            ),
        ]

    # C-FIND ------------------------------------------------------------------------------

    def on_find(self, event: Any) -> Iterator[tuple[Any, Dataset | None]]:
        calling_ae, model = _calling_ae(event), _model(event)
        try:
            request = self._request(event, model, retrieve=False)
        except Refused as refusal:
            _log_refusal("query.find", calling_ae, model, refusal)
            yield refusal.status_dataset(), None
            return
        found = 0
        for answer, supported in find(request, self.index, self.ae_title):
            if event.is_cancelled:
                log.info("query.find", calling_ae=calling_ae, cancelled=True, matches=found)
                yield CANCEL, None
                return
            found += 1
            yield (PENDING if supported else PENDING_UNSUPPORTED_KEYS), answer
        log.info(
            "query.find",
            calling_ae=calling_ae,
            model=model.name,
            qr_level=request.level,
            matches=found,
        )

    # C-MOVE ------------------------------------------------------------------------------

    def on_move(self, event: Any) -> Iterator[Any]:
        calling_ae, model = _calling_ae(event), _model(event)
        move_destination = str(event.move_destination or "").strip()
        destination = self.destinations.get(move_destination)
        if destination is None:
            log.warning(
                "retrieve.move",
                calling_ae=calling_ae,
                destination=move_destination,
                outcome="move destination unknown",
            )
            yield None, None  # pynetdicom answers 0xA801
            return
        try:
            request = self._request(event, model, retrieve=True)
            held = self.index.held(request.narrowing)
        except Refused as refusal:
            # pynetdicom takes a status only after the destination and a count, and opens
            # that association first: with one context it will accept (Verification; with
            # none pynetdicom cannot associate and answers 0xC515). The one sub-operation
            # named is reported as failed.
            _log_refusal("retrieve.move", calling_ae, model, refusal)
            yield destination.host, destination.port, {"contexts": [VERIFICATION_CONTEXT]}
            yield 1
            yield refusal.status_dataset(), None
            return
        tally, opened = Tally(), list[Any]()
        outcome = dict(calling_ae=calling_ae, destination=move_destination, qr_level=request.level)
        if not held:
            log.info("retrieve.move", **outcome, matches=0)
        yield (
            destination.host,
            destination.port,
            {
                "contexts": proposed_contexts(held),
                "evt_handlers": sub_association_handlers(tally, opened),
            },
        )
        yield len(held)
        yield from self._sub_operations(event, held, tally, lambda: opened[0] if opened else None)
        log.info("retrieve.move", **outcome, matches=len(held), **tally.counts())
        self._audit(event, held, tally, destination=str(destination))

    # C-GET -------------------------------------------------------------------------------

    def on_get(self, event: Any) -> Iterator[Any]:
        calling_ae, model = _calling_ae(event), _model(event)
        try:
            request = self._request(event, model, retrieve=True)
            held = self.index.held(request.narrowing)
        except Refused as refusal:
            _log_refusal("retrieve.get", calling_ae, model, refusal)
            yield 1
            yield refusal.status_dataset(), None
            return
        outcome = dict(calling_ae=calling_ae, qr_level=request.level, matches=len(held))
        if not held:
            log.info("retrieve.get", **outcome)
        yield len(held)
        tally = Tally()
        event.assoc.bind(evt.EVT_DIMSE_RECV, tally.on_response)
        try:
            yield from self._sub_operations(event, held, tally, lambda: event.assoc)
        finally:
            event.assoc.unbind(evt.EVT_DIMSE_RECV, tally.on_response)
        log.info("retrieve.get", **outcome, **tally.counts())
        self._audit(event, held, tally, destination=f"{calling_ae} (C-GET)")

    def _audit(self, event: Any, held: list[Held], tally: Tally, *, destination: str) -> None:
        """Who took which studies where: the audit trail's record of a retrieval."""
        counts = tally.counts()
        audit.record(
            self.database,
            audit.RETRIEVED,
            actor=_calling_ae(event),
            address=f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
            outcome=AuditOutcome.sent if counts["failed"] == 0 else AuditOutcome.partly_failed,
            destination=destination,
            study_uids=sorted({item.study_uid for item in held}),
            **counts,
        )

    # -------------------------------------------------------------------------------------

    def _request(self, event: Any, model: Model, *, retrieve: bool) -> Request:
        try:
            identifier = event.identifier
        except Exception as error:
            raise Refused(CANNOT_UNDERSTAND, f"identifier cannot be decoded: {error}") from error
        return checked(identifier, model, retrieve=retrieve)

    def _sub_operations(
        self, event: Any, held: list[Held], tally: Tally, association: Any
    ) -> Iterator[tuple[int, Dataset | None]]:
        for item in held:
            if event.is_cancelled:
                yield CANCEL, None
                return
            accepts = accepted_by(association())
            yield PENDING, sendable(self.index, item, accepts, tally, self.max_decoded_bytes)


def _model(event: Any) -> Model:
    return MODELS[str(event.context.abstract_syntax)]


def _calling_ae(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _log_refusal(name: str, calling_ae: str, model: Model, refusal: Refused) -> None:
    log.warning(
        name,
        calling_ae=calling_ae,
        model=model.name,
        status=hex(refusal.status),
        reason=refusal.reason,
    )
