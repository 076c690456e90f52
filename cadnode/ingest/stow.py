"""STOW-RS receive (PS3.18 10.5): instances stored over HTTP on the admin port, at
POST /dicomweb/studies and POST /dicomweb/studies/{study}.

The guard (cadnode/admin/guard.py) authenticates the request from its headers before a
byte of its body is read, and hands the body over as a stream, counted and cut (413) where
it passes `dicomweb.max_request_mb`. Here the `multipart/related; type="application/dicom"`
body is parsed as it arrives (python-multipart): each part, a PS3.10 file, has its File Meta
Information split off and its dataset written to a scratch file beside the spool (never
past `dicomweb.max_part_mb`), then takes the very path a C-STORE takes
(cadnode.ingest.receive.Intake): the same checks, durable store, index and audit. The answer
comes only once every stored part is durable and committed. When the request ends, the
studies it stored get a completion signal, as a released association gives them.

Who sent it: the client's name (`dicomweb.clients`; ADMIN for the admin token) is the
calling AE title of what it stores, so routing rules match on it, and the actor of its audit
events. A request the node cannot take now (`dicomweb.max_requests` running, the spool's
disk below its watermark) is answered 503 before its body is read.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import threading
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import structlog
from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from cadnode.admin.auth import DICOMWEB_CLIENT
from cadnode.admin.context import AdminContext
from cadnode.admin.guard import BodyOverLimit
from cadnode.core.config import Settings
from cadnode.core.db import CompletionSignal, CompletionSource, Database
from cadnode.dicom.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from cadnode.dicom.web import service_root
from cadnode.ingest.receive import PREAMBLE, Intake, Offer, Scratch, Taken
from cadnode.ingest.spool import OutOfSpace, Spool

log = structlog.get_logger("cadnode.ingest.stow")

DICOM = "application/dicom"
JSON = "application/dicom+json"
XML = "application/dicom+xml"
NATIVE_XML = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
# A PS3.10 file: 128-byte preamble, "DICM", then (0002,0000) UL, the meta group's length.
META_START = 132
GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"
META_GROUP = b"\x02\x00"
# Explicit VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
MAX_META = 64 * 2**10
MAX_PREAMBLE = 64 * 2**10  # of the multipart body, before its first boundary
RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Outcome:
    """One part's fate, for the response: stored (`failure` None) or failed, and why."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    failure: int | None = None


class _PartRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class _Part:
    """The part being read: its headers, then its File Meta Information, then its dataset
    (in a scratch file)."""

    headers: dict[str, str] = field(default_factory=dict)
    field_name: bytearray = field(default_factory=bytearray)
    field_value: bytearray = field(default_factory=bytearray)
    head: bytearray = field(default_factory=bytearray)  # until the meta is whole
    meta: Dataset | None = None
    dataset: BinaryIO | None = None
    size: int = 0
    refusal: _PartRefused | None = None


class Parts:
    """One request's body, parsed and stored part by part as it comes. Blocking (file
    writes, fsync, the index): the route feeds it from a worker thread."""

    def __init__(self, intake: Intake, boundary: bytes, sender: Offer, max_part_bytes: int) -> None:
        self.intake = intake
        self.sender = sender  # who, from where, and the target study: the parts' common ground
        self.max_part_bytes = max_part_bytes
        self.outcomes: list[Outcome] = []
        self.ended = False
        self._delimiter = b"--" + boundary
        self._preamble: bytearray | None = bytearray()
        self._part: _Part | None = None
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_end": self._ended,
            },
        )

    def feed(self, chunk: bytes) -> None:
        """MultipartParseError on a malformed body."""
        if self._preamble is not None:
            chunk = self._past_preamble(chunk)
        if chunk:
            self._parser.write(chunk)

    def close(self) -> None:
        """Whatever part was cut short is dropped (it was never stored)."""
        if self._part is not None and self._part.dataset is not None:
            self._part.dataset.close()
        self._part = None

    def _past_preamble(self, chunk: bytes) -> bytes:
        """RFC 2046 lets a preamble come before the first boundary; the parser does not."""
        assert self._preamble is not None
        self._preamble += chunk
        start = self._preamble.find(self._delimiter)
        if start < 0:
            if len(self._preamble) > MAX_PREAMBLE:
                raise MultipartParseError("no boundary in the first 64 KiB of the body")
            return b""
        rest, self._preamble = bytes(self._preamble[start:]), None
        return rest

    # -- the parser's callbacks ------------------------------------------------------------

    def _begin(self) -> None:
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        self._part.field_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        self._part.field_value += data[start:end]

    def _header_end(self) -> None:
        part = self._part
        assert part is not None
        name = part.field_name.decode("latin-1").strip().lower()
        part.headers[name] = part.field_value.decode("latin-1").strip()
        part.field_name.clear()
        part.field_value.clear()

    def _headers_finished(self) -> None:
        part = self._part
        assert part is not None
        kind, _ = parse_options_header(part.headers.get("content-type", DICOM))
        if kind.decode("latin-1").lower() != DICOM:
            part.refusal = _PartRefused(CANNOT_UNDERSTAND, f"a part of type {kind!r}, not {DICOM}")

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        if part.refusal is not None:
            return  # its bytes are skipped over
        part.size += end - start
        try:
            if part.size > self.max_part_bytes:
                limit = self.max_part_bytes // 2**20
                raise _PartRefused(OUT_OF_RESOURCES, f"over dicomweb.max_part_mb ({limit} MiB)")
            self._write(part, memoryview(data)[start:end])
        except _PartRefused as refusal:
            part.refusal = refusal  # the rest of it is skipped over
            if part.dataset is not None:
                part.dataset.close()

    def _write(self, part: _Part, data: memoryview) -> None:
        if part.dataset is not None:
            part.dataset.write(data)
            return
        part.head += data
        end = _meta_end(part.head)
        if end is None or len(part.head) < end:
            return
        part.meta = _file_meta(bytes(part.head[:end]))
        part.dataset = tempfile.TemporaryFile(  # noqa: SIM115 - closed when the part ends
            dir=self.intake.spool.folder, prefix=".stow-"
        )
        part.dataset.write(memoryview(part.head)[end:])
        part.head = bytearray()

    def _end(self) -> None:
        part, self._part = self._part, None
        assert part is not None
        try:
            self.outcomes.append(self._take(part))
        finally:
            if part.dataset is not None:
                part.dataset.close()

    def _ended(self) -> None:
        self.ended = True

    # -- one part into the spool -----------------------------------------------------------

    def _take(self, part: _Part) -> Outcome:
        meta = part.meta or Dataset()
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", ""))
        if part.refusal is None and (part.meta is None or part.dataset is None):
            part.refusal = _PartRefused(CANNOT_UNDERSTAND, "not a DICOM PS3.10 file")
        if part.refusal is not None:
            self.intake.refuse(
                self.sender.calling_ae, self.sender.peer, part.refusal.status, str(part.refusal)
            )
            return Outcome(sop_class, sop_instance, failure=part.refusal.status)
        assert part.dataset is not None
        part.dataset.flush()
        part.dataset.seek(0)
        offer = Offer(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
            calling_ae=self.sender.calling_ae,
            called_ae=self.sender.called_ae,
            peer=self.sender.peer,
            said_by="the part's File Meta Information",
            study_uid=self.sender.study_uid,
        )
        return _outcome(offer, self.intake.take(offer, part.dataset))


def _meta_end(head: bytearray) -> int | None:
    """Where the File Meta Information ends in a part's first bytes (a PS3.10 file's, or its
    meta group without the preamble, as pydicom and so dicomweb-client write a dataset read
    from no file); None while they do not say yet. _PartRefused if they are neither."""
    if head[:2] == META_GROUP:
        start = 0
    elif len(head) < META_START + 2:
        return None
    elif head[128:META_START] == b"DICM" and head[META_START : META_START + 2] == META_GROUP:
        start = META_START
    else:
        raise _PartRefused(CANNOT_UNDERSTAND, "not a DICOM PS3.10 file (no File Meta Information)")
    end: int | None
    if head[start : start + 8] == GROUP_LENGTH:
        if len(head) < start + 12:
            return None
        end = start + 12 + int.from_bytes(head[start + 8 : start + 12], "little")
    else:  # no (0002,0000): the group ends where the first element of another begins
        end = _meta_walked(head, start)
    if end is not None and end > MAX_META:
        raise _PartRefused(CANNOT_UNDERSTAND, "File Meta Information over 64 KiB")
    return end


def _meta_walked(head: bytearray, offset: int) -> int | None:
    """The end of the meta group from its elements (explicit VR little endian, PS3.10 7.1);
    None until the first element past it has arrived."""
    while offset <= MAX_META:
        if len(head) < offset + 8:
            return None
        if head[offset : offset + 2] != META_GROUP:
            return offset
        if bytes(head[offset + 4 : offset + 6]) in LONG_VRS:
            if len(head) < offset + 12:
                return None
            offset += 12 + int.from_bytes(head[offset + 8 : offset + 12], "little")
        else:
            offset += 8 + int.from_bytes(head[offset + 6 : offset + 8], "little")
    raise _PartRefused(CANNOT_UNDERSTAND, "File Meta Information over 64 KiB")


def _file_meta(encoded: bytes) -> Dataset:
    if encoded[:2] == META_GROUP:
        encoded = PREAMBLE + encoded
    try:
        meta = dcmread(io.BytesIO(encoded)).file_meta
    except Exception as error:  # pydicom raises many kinds on a malformed stream
        raise _PartRefused(CANNOT_UNDERSTAND, f"File Meta Information: {error}") from error
    if "TransferSyntaxUID" not in meta:
        raise _PartRefused(CANNOT_UNDERSTAND, "File Meta Information without a transfer syntax")
    return meta


def _outcome(offer: Offer, taken: Taken) -> Outcome:
    if taken.arrival is None:
        return Outcome(offer.sop_class_uid, offer.sop_instance_uid, failure=taken.status)
    arrival = taken.arrival
    return Outcome(
        arrival.sop_class_uid, arrival.sop_instance_uid, arrival.study_uid, arrival.series_uid
    )


# -- the route ---------------------------------------------------------------------------


class Stow:
    """The STOW-RS service of a running node: its spool intake (made at the first request),
    and the requests in flight."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database
        self._intake: Intake | None = None
        self._lock = threading.Lock()
        self._running = 0
        self._studies_sending: Counter[str] = Counter()  # by requests in flight, in this process

    @property
    def intake(self) -> Intake:
        with self._lock:
            if self._intake is None:
                storage = self.settings.storage
                spool = Spool(
                    storage.spool,
                    self.database,
                    int(storage.min_free_mb * 2**20),
                    storage.spool_journal,
                )
                scratch = Scratch(storage.spool, self.settings.limits.max_inflated_bytes)
                self._intake = Intake(spool, scratch, self.database, self._wake)
            return self._intake

    def _wake(self) -> None:
        self.database.on_change()  # the daemon's stages look again (assemble first)

    def close(self) -> None:
        with self._lock:
            if self._intake is not None:
                self._intake.spool.close()

    async def store(self, request: Request, study: str | None) -> Response:
        client = getattr(request.state, DICOMWEB_CLIENT, None)
        if not client:  # the guard lets no one through without a name: never mounted bare
            return PlainTextResponse("authentication required", 401)
        boundary = _boundary(request.headers.get("content-type", ""))
        if isinstance(boundary, Response):
            return boundary
        refusal = _unacceptable(request) or self._busy(request)
        if refusal is not None:
            return refusal
        peer = f"{request.client.host}:{request.client.port}" if request.client else "unknown"
        sender = Offer("", "", "", str(client), self.settings.dicom.ae_title, peer, study_uid=study)
        parts = Parts(self.intake, boundary, sender, self.settings.dicomweb.max_part_bytes)
        try:
            failed = await self._read(request, parts)
        finally:
            await to_thread.run_sync(parts.close)
            with self._lock:
                self._running -= 1
        if failed is not None:
            return failed
        await to_thread.run_sync(self._signal_done, parts.outcomes)
        log.info(
            "stow.stored",
            client=client,
            stored=sum(1 for o in parts.outcomes if o.failure is None),
            failed=sum(1 for o in parts.outcomes if o.failure is not None),
        )
        return _response(request, parts.outcomes, study)

    def _busy(self, request: Request) -> Response | None:
        """503 (and a counted request slot otherwise): too many at once, or the disk low."""
        declared = request.headers.get("content-length", "0").strip()
        try:
            self.intake.spool.disk.check(int(declared) if declared.isdigit() else 0)
        except OutOfSpace as error:
            return _unavailable(f"out of space: {error}")
        with self._lock:
            if self._running >= self.settings.dicomweb.max_requests:
                return _unavailable("as many STOW-RS requests as the node takes at once")
            self._running += 1
        return None

    async def _read(self, request: Request, parts: Parts) -> Response | None:
        """Feed the body to `parts`; a refusal if it cannot be read to its end."""
        timeout = self.settings.dicomweb.read_timeout_s
        sending: set[str] = set()
        try:
            async for chunk in _chunks(request.stream(), timeout):
                await to_thread.run_sync(parts.feed, chunk)
                self._mark_sending(parts, sending)
        except BodyOverLimit as error:
            return _closing(PlainTextResponse(str(error), 413))
        except TimeoutError:
            return _closing(PlainTextResponse(f"no body data for {timeout:g} s", 408))
        except ClientDisconnect:
            return _closing(PlainTextResponse("client disconnected", 400))
        except MultipartParseError as error:
            return _closing(PlainTextResponse(f"malformed multipart body: {error}", 400))
        finally:
            with self._lock:
                self._studies_sending.subtract(sending)
        if not parts.ended:
            return _closing(PlainTextResponse("multipart body ends before its last boundary", 400))
        if not parts.outcomes:
            return PlainTextResponse("no part in the multipart body", 400)
        return None

    def _mark_sending(self, parts: Parts, sending: set[str]) -> None:
        new = {o.study_uid for o in parts.outcomes if o.study_uid} - sending
        if new:
            with self._lock:
                self._studies_sending.update(new)
            sending |= new

    def _signal_done(self, outcomes: list[Outcome]) -> None:
        """As a released association: the studies it stored that no other request in flight
        is sending (assemble honours it with `assemble.close_on_association_release`)."""
        with self._lock:
            elsewhere = set(+self._studies_sending)
        done = sorted({o.study_uid for o in outcomes if o.study_uid} - elsewhere)
        if not done:
            return
        with self.database.session() as session:
            session.add_all(
                CompletionSignal(study_uid=uid, source=CompletionSource.association) for uid in done
            )
            session.commit()
        self._wake()


async def _chunks(stream: AsyncIterator[bytes], timeout_s: float) -> AsyncIterator[bytes]:
    """The body's chunks, each within `timeout_s` of the last (TimeoutError otherwise)."""
    iterator = aiter(stream)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(iterator), timeout_s)
        except StopAsyncIteration:
            return
        if chunk:
            yield chunk


def _boundary(content_type: str) -> bytes | Response:
    kind, options = parse_options_header(content_type)
    parts_type = options.get(b"type", b"").decode("latin-1").strip().lower()
    if kind.decode("latin-1").lower() != "multipart/related" or parts_type != DICOM:
        return PlainTextResponse(f'STOW-RS here takes multipart/related; type="{DICOM}" only', 415)
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 70:  # RFC 2046: 1 to 70 characters
        return PlainTextResponse("multipart/related without a valid boundary", 400)
    return boundary


def _response_type(request: Request) -> str | None:
    """The media type of the answer the client accepts (JSON unless it asks for XML)."""
    ranges = []
    for position, item in enumerate(request.headers.get("accept", "*/*").split(",")):
        media, options = parse_options_header(item.strip())
        try:
            quality = float(options.get(b"q", b"1"))
        except ValueError:
            quality = 1.0
        if quality > 0:
            ranges.append((-quality, position, media.decode("latin-1").lower()))
    for _, _, kind in sorted(ranges):
        if kind in (JSON, "application/json", "application/*", "*/*"):
            return JSON
        if kind == XML:
            return XML
    return None


def _unacceptable(request: Request) -> Response | None:
    if _response_type(request) is None:
        return PlainTextResponse(f"STOW-RS answers {JSON} or {XML}", 406)
    return None


def _unavailable(reason: str) -> Response:
    return _closing(
        PlainTextResponse(
            f"not now: {reason}; try again later", 503, headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    )


def _closing(response: Response) -> Response:
    """Answered before the body was read to its end: the connection cannot be reused."""
    response.headers["connection"] = "close"
    return response


def _response(request: Request, outcomes: list[Outcome], study: str | None) -> Response:
    stored = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    status = 200 if not failed else 409 if not stored else 202
    base = service_root(request) + "/studies"
    answer = Dataset()
    studies = {o.study_uid for o in stored} | ({study} if study else set())
    if len(studies) == 1:
        answer.RetrieveURL = f"{base}/{studies.pop()}"
    if failed:
        answer.FailedSOPSequence = [_failed_item(o) for o in failed]
    answer.ReferencedSOPSequence = [_stored_item(o, base) for o in stored]
    if _response_type(request) == XML:
        return Response(_native_xml(answer), status, media_type=XML)
    return JSONResponse(answer.to_json_dict(), status, media_type=JSON)


def _stored_item(outcome: Outcome, base: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    item.RetrieveURL = (
        f"{base}/{outcome.study_uid}/series/{outcome.series_uid}"
        f"/instances/{outcome.sop_instance_uid}"
    )
    return item


def _failed_item(outcome: Outcome) -> Dataset:
    item = Dataset()
    if outcome.sop_class_uid:
        item.ReferencedSOPClassUID = outcome.sop_class_uid
    if outcome.sop_instance_uid:
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    item.FailureReason = outcome.failure
    return item


def _native_xml(dataset: Dataset) -> bytes:
    """The PS3.19 Native DICOM Model of a response (its few attributes: UIDs, URLs, codes)."""
    root = ElementTree.Element("NativeDicomModel", xmlns=NATIVE_XML)
    _xml_attributes(root, dataset.to_json_dict())
    return bytes(ElementTree.tostring(root, encoding="utf-8", xml_declaration=True))


def _xml_attributes(parent: ElementTree.Element, attributes: dict[str, Any]) -> None:
    for tag, attribute in sorted(attributes.items()):
        keyword = keyword_for_tag(int(tag, 16))
        element = ElementTree.SubElement(
            parent, "DicomAttribute", {"tag": tag, "vr": attribute["vr"], "keyword": keyword}
        )
        for number, value in enumerate(attribute.get("Value", []), start=1):
            if attribute["vr"] == "SQ":
                item = ElementTree.SubElement(element, "Item", number=str(number))
                _xml_attributes(item, value)
            else:
                ElementTree.SubElement(element, "Value", number=str(number)).text = str(value)


def stow_router(context: AdminContext) -> APIRouter:
    """POST /dicomweb/studies and /dicomweb/studies/{study}, for the admin app."""
    stow = Stow(context.settings, context.database)
    router = APIRouter()

    @router.post("/dicomweb/studies")
    async def store(request: Request) -> Response:
        return await stow.store(request, None)

    @router.post("/dicomweb/studies/{study}")
    async def store_in_study(request: Request, study: str) -> Response:
        return await stow.store(request, study)

    return router
