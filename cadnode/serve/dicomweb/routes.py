"""The /dicomweb routes on the node's HTTP port: QIDO-RS search and WADO-RS retrieve.

Authentication is the guard's (cadnode.admin.guard), before a route runs; the client's
name it found is in the request's state and goes into the log and the audit trail. CORS,
for a viewer served from another origin, is `dicomweb.cors_origins` (`Cors`, outside the
guard, so a preflight needs no token and a refusal still carries the CORS headers).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.uid import UID
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from cadnode.admin.auth import AUTHENTICATED_BY, DICOMWEB_CLIENT, client_address
from cadnode.admin.context import AdminContext
from cadnode.core import audit
from cadnode.core.db import AuditOutcome
from cadnode.dicom.pixels import ImageRefused
from cadnode.dicom.web import PREFIX, service_root
from cadnode.serve.dicomweb import search as qido
from cadnode.serve.dicomweb import wado
from cadnode.serve.index import Held, Narrowing, QueryIndex
from cadnode.serve.query import IMAGE, SERIES, STUDY, UNIQUE_KEY, Refused

log = structlog.get_logger("cadnode.serve.dicomweb")

DICOM_JSON = "application/dicom+json"
RETRIEVE_URL = 0x00081190
MORE_RESULTS = "There are additional results that can be requested."

router = APIRouter(prefix=PREFIX)


@dataclass
class DicomWeb:
    """What the routes share: the index, the limits, the audit trail's database."""

    context: AdminContext
    index: QueryIndex

    @classmethod
    def of(cls, request: Request) -> DicomWeb:
        state = request.app.state
        if not hasattr(state, "dicomweb"):
            context: AdminContext = state.context
            storage = context.settings.storage
            index = QueryIndex(context.database, storage.spool, storage.results)
            state.dicomweb = cls(context, index)
        found: DicomWeb = state.dicomweb
        return found


# -- QIDO-RS -----------------------------------------------------------------------------


@router.get("/studies")
def search_studies(request: Request) -> Response:
    return _search(request, STUDY, {})


@router.get("/series")
def search_series(request: Request) -> Response:
    return _search(request, SERIES, {})


@router.get("/instances")
def search_instances(request: Request) -> Response:
    return _search(request, IMAGE, {})


@router.get("/studies/{study}/series")
def search_series_of_study(request: Request, study: str) -> Response:
    return _search(request, SERIES, {STUDY: study})


@router.get("/studies/{study}/instances")
def search_instances_of_study(request: Request, study: str) -> Response:
    return _search(request, IMAGE, {STUDY: study})


@router.get("/studies/{study}/series/{series}/instances")
def search_instances_of_series(request: Request, study: str, series: str) -> Response:
    return _search(request, IMAGE, {STUDY: study, SERIES: series})


def _search(request: Request, level: str, named: dict[str, str]) -> Response:
    service = DicomWeb.of(request)
    settings = service.context.settings
    try:
        search = qido.parse(
            list(request.query_params.multi_items()),
            level,
            named,
            default_limit=settings.dicomweb.search_default_limit,
            max_limit=settings.dicomweb.search_max_limit,
        )
        search.limit += 1  # one more than the page: whether there are more to ask for
        answers = list(qido.matches(search, service.index, settings.dicom.ae_title))
    except (qido.BadSearch, Refused) as error:
        return JSONResponse({"detail": str(error)}, 400)
    search.limit -= 1
    warnings = list(search.warnings)
    if len(answers) > search.limit:
        answers, warnings = answers[: search.limit], [*warnings, MORE_RESULTS]
    base = service_root(request)
    body = [_with_retrieve_url(answer, level, base).to_json_dict() for answer in answers]
    log.info("dicomweb.search", client=_client(request), level=level, matches=len(body))
    return Response(
        json.dumps(body),
        media_type=DICOM_JSON,
        headers={"Warning": ", ".join(f'299 cadnode "{w}"' for w in warnings)} if warnings else {},
    )


def _with_retrieve_url(answer: Dataset, level: str, base: str) -> Dataset:
    del answer.QueryRetrieveLevel
    url = f"{base}/studies/{answer.get('StudyInstanceUID', '')}"
    if level != STUDY:
        url += f"/series/{answer.get('SeriesInstanceUID', '')}"
    if level == IMAGE:
        url += f"/instances/{answer.get('SOPInstanceUID', '')}"
    answer.add(DataElement(RETRIEVE_URL, "UR", url))
    return answer


# -- WADO-RS: instances ------------------------------------------------------------------


@router.get("/studies/{study}")
def retrieve_study(request: Request, study: str) -> Response:
    return _retrieve(request, {STUDY: study})


@router.get("/studies/{study}/series/{series}")
def retrieve_series(request: Request, study: str, series: str) -> Response:
    return _retrieve(request, {STUDY: study, SERIES: series})


@router.get("/studies/{study}/series/{series}/instances/{instance}")
def retrieve_instance(request: Request, study: str, series: str, instance: str) -> Response:
    return _retrieve(request, {STUDY: study, SERIES: series, IMAGE: instance})


def _retrieve(request: Request, named: dict[str, str]) -> Response:
    service = DicomWeb.of(request)
    held = _held(service, named)
    if isinstance(held, Response):
        return held
    ranges = wado.accepted(request.headers.get("accept"), wado.DICOM)
    syntaxes = [wado.instance_syntax(UID(item.transfer_syntax), ranges) for item in held]
    if None in syntaxes:
        offered = "transfer-syntax=* (as stored), Explicit or Implicit VR Little Endian"
        return _refuse(
            406, f'this node sends multipart/related; type="application/dicom" with {offered}'
        )
    limit = service.context.settings.limits.max_decoded_image_bytes
    separator = wado.boundary()
    parts = (
        (
            f"{wado.DICOM}; transfer-syntax={syntax}",
            wado.part10(service.index.file(item), UID(item.transfer_syntax), UID(syntax), limit),
        )
        for item, syntax in zip(held, syntaxes, strict=True)
        if syntax is not None
    )
    body = _audited(request, service, held, wado.multipart(parts, separator))
    return StreamingResponse(
        body, media_type=f'multipart/related; type="{wado.DICOM}"; boundary={separator}'
    )


def _audited(
    request: Request, service: DicomWeb, held: list[Held], body: Iterator[bytes]
) -> Iterator[bytes]:
    """The body, then the retrieval in the log and the audit trail: complete, or cut short
    (the client went away, an instance could not be read or converted)."""
    completed = False
    try:
        yield from body
        completed = True
    except (OSError, ValueError, ImageRefused) as error:
        log.warning("dicomweb.retrieve_failed", reason=str(error))
    finally:
        client = _client(request)
        log.info("dicomweb.retrieve", client=client, instances=len(held), completed=completed)
        audit.record(
            service.context.database,
            audit.RETRIEVED,
            actor=client,
            address=client_address(request.scope),
            outcome=AuditOutcome.sent if completed else AuditOutcome.partly_failed,
            destination=f"{client} (WADO-RS)",
            study_uids=sorted({item.study_uid for item in held}),
            completed=len(held) if completed else 0,
        )


# -- WADO-RS: metadata, frames, bulk data ------------------------------------------------


@router.get("/studies/{study}/metadata")
def study_metadata(request: Request, study: str) -> Response:
    return _metadata(request, {STUDY: study})


@router.get("/studies/{study}/series/{series}/metadata")
def series_metadata(request: Request, study: str, series: str) -> Response:
    return _metadata(request, {STUDY: study, SERIES: series})


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
def instance_metadata(request: Request, study: str, series: str, instance: str) -> Response:
    return _metadata(request, {STUDY: study, SERIES: series, IMAGE: instance})


def _metadata(request: Request, named: dict[str, str]) -> Response:
    service = DicomWeb.of(request)
    held = _held(service, named)
    if isinstance(held, Response):
        return held
    base = service_root(request)

    def headers() -> Iterator[bytes]:
        for number, item in enumerate(held):
            bulk = (
                f"{base}/studies/{item.study_uid}/series/{item.series_uid}"
                f"/instances/{item.sop_instance_uid}/bulkdata"
            )
            yield (b"[" if number == 0 else b",") + json.dumps(
                wado.metadata(service.index.file(item), bulk)
            ).encode()
        yield b"]"

    return StreamingResponse(_audited(request, service, held, headers()), media_type=DICOM_JSON)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{numbers}")
def retrieve_frames(
    request: Request, study: str, series: str, instance: str, numbers: str
) -> Response:
    service = DicomWeb.of(request)
    held = _held(service, {STUDY: study, SERIES: series, IMAGE: instance})
    if isinstance(held, Response):
        return held
    settings = service.context.settings
    try:
        wanted = wado.frame_numbers(numbers, settings.dicomweb.retrieve_max_frames)
        found = wado.frames(
            service.index.file(held[0]),
            wanted,
            wado.accepted(request.headers.get("accept"), wado.OCTETS),
            settings.limits.max_decoded_image_bytes,
        )
    except wado.NotFound as error:
        return _refuse(404, str(error))
    except (wado.NotAcceptable, ImageRefused) as error:
        return _refuse(406, str(error))
    except ValueError as error:
        return _refuse(400, str(error))
    log.info("dicomweb.frames", client=_client(request), frames=len(wanted))
    return _parts(found.media_type, found.transfer_syntax, found.parts)


@router.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}")
def retrieve_bulk_data(
    request: Request, study: str, series: str, instance: str, tag: str
) -> Response:
    service = DicomWeb.of(request)
    held = _held(service, {STUDY: study, SERIES: series, IMAGE: instance})
    if isinstance(held, Response):
        return held
    try:
        value = wado.bulk_value(service.index.file(held[0]), int(tag, 16))
    except (wado.NotFound, ValueError) as error:
        return _refuse(404, str(error))
    return _parts(wado.OCTETS, None, [value])


def _parts(media_type: str, syntax: str | None, parts: Iterable[bytes]) -> Response:
    separator = wado.boundary()
    content_type = f"{media_type}; transfer-syntax={syntax}" if syntax else media_type
    body = b"".join(wado.multipart(((content_type, [part]) for part in parts), separator))
    return Response(
        body, media_type=f'multipart/related; type="{media_type}"; boundary={separator}'
    )


# -- shared ------------------------------------------------------------------------------


def _held(service: DicomWeb, named: dict[str, str]) -> list[Held] | Response:
    """The held objects the path names, or the answer saying there are none or too many."""
    narrowing = Narrowing(
        study_uids=[named[STUDY]],
        series_uids=[named[SERIES]] if SERIES in named else [],
        sop_instance_uids=[named[IMAGE]] if IMAGE in named else [],
    )
    held = service.index.held(narrowing)
    most = service.context.settings.dicomweb.retrieve_max_instances
    if not held:
        deepest = list(named)[-1]  # named from the study down
        return _refuse(404, f"no such {UNIQUE_KEY[deepest]} held here")
    if len(held) > most:
        return _refuse(
            413,
            f"{len(held)} instances, over dicomweb.retrieve_max_instances ({most}): "
            "retrieve them series by series",
        )
    return held


def _refuse(status: int, reason: str) -> Response:
    return JSONResponse({"detail": reason}, status)


def _client(request: Request) -> str:
    state = request.scope.get("state", {})
    return str(state.get(DICOMWEB_CLIENT) or state.get(AUTHENTICATED_BY) or "unknown")


class Cors:
    """CORS for /dicomweb alone, from `dicomweb.cors_origins`; none configured, none sent."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.cors: ASGIApp | None = (
            CORSMiddleware(
                app,
                allow_origins=origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Accept", "Content-Type"],
                expose_headers=["Warning", "Content-Type", "Content-Length", "Content-Location"],
                max_age=600,
            )
            if origins
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        wanted = scope["type"] == "http" and Path(scope["path"]).parts[1:2] == ("dicomweb",)
        await (self.cors if self.cors is not None and wanted else self.app)(scope, receive, send)
