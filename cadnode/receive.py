"""Receive: the C-ECHO / C-STORE SCP.

An instance is answered Success only once its bytes are durably in the spool (as the
modality sent them: no transcoding) and indexed in the database. The same SOP Instance UID
received twice is stored once. Bad input gets a DIMSE failure status and a log event,
never a crashed thread.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from sqlmodel import Session, select

from cadnode.config import Settings
from cadnode.db import Database, Instance, Job, JobState, Study, utcnow
from cadnode.dicomnet import set_tcp_nodelay
from cadnode.files import is_valid_uid, write_durably

log = structlog.get_logger("cadnode.receive")

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

VERIFICATION = "1.2.840.10008.1.1"
HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]


@dataclass(frozen=True)
class Arrival:
    """What the index needs to know about an instance that has just arrived."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    calling_ae: str
    peer: str


class Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Receiver:
    def __init__(self, settings: Settings, database: Database, on_indexed: Callable[[], None]):
        self.settings = settings
        self.database = database
        self.spool = settings.storage.spool
        self.on_indexed = on_indexed
        # One lock around indexing keeps study/job creation race-free between associations;
        # the slow part (writing the file) stays outside it.
        self._index_lock = threading.Lock()
        self._server: Any = None

    def start(self) -> int:
        """Start serving in the background; returns the bound port (useful with port 0)."""
        ae = AE(ae_title=self.settings.dicom.ae_title)
        ae.maximum_associations = self.settings.dicom.max_associations
        ae.network_timeout = self.settings.dicom.network_timeout_s
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_ACCEPTED, _log_association("association.accepted")),
            (evt.EVT_REJECTED, _log_association("association.rejected")),
            (evt.EVT_ABORTED, _log_association("association.aborted")),
        ]
        address = (self.settings.dicom.bind, self.settings.dicom.port)
        self._server = ae.start_server(address, block=False, evt_handlers=handlers)
        port = int(self._server.server_address[1])
        log.info("receive.listening", ae_title=ae.ae_title, bind=address[0], port=port)
        return port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            log.info("receive.stopped")

    def _on_echo(self, event: Any) -> int:
        log.info("receive.echo", calling_ae=_calling_ae(event))
        return SUCCESS

    def _on_store(self, event: Any) -> int:
        calling_ae, peer = _calling_ae(event), _peer(event)
        try:
            encoded = event.encoded_dataset(include_meta=True)
            arrival = _read_arrival(encoded, event, calling_ae, peer)
            self.store(arrival, encoded)
        except Rejected as rejection:
            log.warning(
                "instance.rejected",
                calling_ae=calling_ae,
                peer=peer,
                status=hex(rejection.status),
                reason=rejection.reason,
            )
            return rejection.status
        except OSError as error:
            log.error("instance.not_stored", calling_ae=calling_ae, peer=peer, error=str(error))
            return OUT_OF_RESOURCES
        except Exception:
            # Our fault, not the sender's: say so, keep the association and the thread alive.
            log.exception("instance.not_stored", calling_ae=calling_ae, peer=peer)
            return PROCESSING_FAILURE
        return SUCCESS

    def store(self, arrival: Arrival, encoded: bytes) -> None:
        """Write and index one instance; a duplicate SOP Instance UID is a no-op."""
        with self.database.session() as session:
            if session.get(Instance, arrival.sop_instance_uid) is not None:
                log.info("instance.duplicate", calling_ae=arrival.calling_ae)
                return
        relative = Path(arrival.study_uid) / arrival.series_uid / f"{arrival.sop_instance_uid}.dcm"
        size = write_durably(self.spool / relative, [encoded])
        with self._index_lock, self.database.session() as session:
            if session.get(Instance, arrival.sop_instance_uid) is not None:
                return  # a concurrent association won the race with the same bytes
            job = _open_job(session, arrival.study_uid)
            job.instance_count += 1
            job.last_instance_at = utcnow()
            session.add(job)
            session.flush()
            assert job.id is not None
            session.add(
                Instance(
                    sop_instance_uid=arrival.sop_instance_uid,
                    sop_class_uid=arrival.sop_class_uid,
                    series_uid=arrival.series_uid,
                    transfer_syntax=arrival.transfer_syntax,
                    path=str(relative),
                    size=size,
                    calling_ae=arrival.calling_ae,
                    peer=arrival.peer,
                    job_id=job.id,
                )
            )
            session.commit()
            log.info(
                "instance.received",
                job=job.id,
                study=job.study_id,
                version=job.version,
                instances=job.instance_count,
                calling_ae=arrival.calling_ae,
                size=size,
            )
        self.on_indexed()


def _open_job(session: Session, study_uid: str) -> Job:
    """The study's job still collecting instances, or a new version of it."""
    study = session.exec(select(Study).where(Study.study_uid == study_uid)).first()
    if study is None:
        study = Study(study_uid=study_uid)
        session.add(study)
        session.flush()
    assert study.id is not None
    jobs = list(session.exec(select(Job).where(Job.study_id == study.id).order_by(Job.version)))  # type: ignore[arg-type]
    if jobs and jobs[-1].state == JobState.received:
        return jobs[-1]
    job = Job(study_id=study.id, version=len(jobs) + 1)
    session.add(job)
    session.flush()
    if jobs:
        log.info("job.reopened", job=job.id, study=study.id, version=job.version)
    return job


def _read_arrival(encoded: bytes, event: Any, calling_ae: str, peer: str) -> Arrival:
    try:
        header: Dataset = dcmread(
            io.BytesIO(encoded), stop_before_pixels=True, specific_tags=HEADER_TAGS
        )
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as error:
        raise Rejected(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {error}") from error
    uids = {tag: str(header.get(tag, "")) for tag in HEADER_TAGS}
    bad = [tag for tag, value in uids.items() if not is_valid_uid(value)]
    if bad:
        raise Rejected(CANNOT_UNDERSTAND, f"missing or invalid UID: {', '.join(bad)}")
    if uids["SOPClassUID"] != str(event.request.AffectedSOPClassUID):
        raise Rejected(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOP Class UID of the dataset differs from the C-STORE request's",
        )
    if uids["SOPInstanceUID"] != str(event.request.AffectedSOPInstanceUID):
        raise Rejected(
            CANNOT_UNDERSTAND, "SOP Instance UID of the dataset differs from the C-STORE request's"
        )
    return Arrival(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax=str(event.context.transfer_syntax),
        calling_ae=calling_ae,
        peer=peer,
    )


def _calling_ae(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _peer(event: Any) -> str:
    return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"


def _log_association(name: str) -> Callable[[Any], None]:
    def handler(event: Any) -> None:
        log.info(name, calling_ae=_calling_ae(event), peer=_peer(event))

    return handler
