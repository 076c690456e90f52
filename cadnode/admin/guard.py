"""The admin port's gate, in front of every route: who is asking, and how much they may send.

FastAPI parses a route's form and file parameters before its dependencies run, so a login
check written as a dependency comes after an anonymous upload has been read, and spooled to
disk. This ASGI middleware answers first, from the headers alone: a request for a non-public
route without a live session (or, for /metrics, a valid bearer token) is turned away before
a byte of its body is read. Then the body itself is bounded: a declared Content-Length over
the route's limit is refused at once, and a chunked body is counted as it arrives and
refused the moment it passes the limit; only a body within it is handed to the route.

/dicomweb is for machines: a bearer token (the admin's or a `dicomweb.clients` one, whose
name the guard puts in the request's state), else 401; a logged-in browser may read (GET),
and a CORS preflight (OPTIONS) carries no credentials, so it passes. A STOW-RS body is far
too big to hold: it is counted as the route reads it, and cut (413) where it passes
`dicomweb.max_request_mb`.
"""

from __future__ import annotations

import re
from collections import deque
from urllib.parse import quote

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cadnode.admin.auth import (
    API_CLIENT,
    AUTHENTICATED_BY,
    DICOMWEB_CLIENT,
    Gate,
    Outcome,
    Verdict,
    client_address,
)
from cadnode.core.config import DASHBOARD_CLIENT, DicomwebSettings, HttpSettings

# Answer anyone: probes, the login page and its form, the stylesheet.
PUBLIC = frozenset({"/healthz", "/readyz", "/login"})
PUBLIC_PREFIXES = ("/static/",)
# Machine endpoints: a bearer token (or a logged-in browser); 401 rather than a redirect.
TOKEN_ROUTES = frozenset({"/metrics"})
# A RIS's radiologist feedback (cadnode.feedback.api): its bearer token only, never a session.
FEEDBACK_ROUTES = frozenset({"/api/feedback"})
# Routes that take a file, up to `http.max_upload_mb`; every other body is a form.
UPLOAD_ROUTES = frozenset({"/rules/explain"})
# DICOMweb: bearer tokens; a session may read. STOW-RS bodies stream to the route, counted.
DICOMWEB = "/dicomweb"
SESSION_METHODS = frozenset({"GET", "HEAD"})
STOW_PATH = re.compile(r"/dicomweb/studies(/[^/]+)?/?")


class _ClientGone(Exception):
    """The client disconnected while its body was being read."""


class BodyOverLimit(Exception):
    """A streamed body passed its limit while the route was reading it (the route may catch
    it to answer 413 itself; if it does not, the guard does)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over this route's {_size(limit)} limit")
        self.limit = limit


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        gate: Gate,
        settings: HttpSettings,
        dicomweb: DicomwebSettings | None = None,
    ) -> None:
        self.app = app
        self.gate = gate
        self.upload_bytes = int(settings.max_upload_mb * 2**20)
        self.form_bytes = settings.max_form_kb * 2**10
        self.stow_bytes = (dicomweb or DicomwebSettings()).max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = await self._authenticate(scope, headers)
        if refusal is None:
            try:
                refusal, receive = await self._bounded_body(scope, headers, receive)
            except _ClientGone:
                return
        if refusal is None:
            await self._pass_on(scope, receive, send)
            return
        if _declares_body(headers):  # unread: close rather than read the rest to discard it
            refusal.headers["connection"] = "close"
        await refusal(scope, receive, send)

    async def _pass_on(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except BodyOverLimit as error:
            if started:
                raise
            refusal = _too_large(error.limit)
            refusal.headers["connection"] = "close"
            await refusal(scope, receive, send)

    # -- who ------------------------------------------------------------------------------

    async def _authenticate(self, scope: Scope, headers: Headers) -> Response | None:
        path: str = scope["path"]
        address = client_address(scope)
        if path in PUBLIC or path.startswith(PUBLIC_PREFIXES):
            if path == "/login" and scope["method"] == "POST":
                return _refusal(await self.gate.lockout(address))
            return None
        if path == DICOMWEB or path.startswith(DICOMWEB + "/"):
            return await self._authenticate_dicomweb(scope, headers, address)
        if path in FEEDBACK_ROUTES:
            return await self._bearer(scope, headers, address, feedback=True)
        if self.gate.session_live(scope.get("session") or {}):
            scope.setdefault("state", {})[AUTHENTICATED_BY] = "session"
            return None
        if path not in TOKEN_ROUTES:
            return RedirectResponse(f"/login?next={quote(path)}", status_code=303)
        return await self._bearer(scope, headers, address)

    async def _bearer(
        self, scope: Scope, headers: Headers, address: str, *, feedback: bool = False
    ) -> Response | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized()
        verdict = await self.gate.check_token(address, token.strip(), feedback=feedback)
        if verdict.ok:
            state = scope.setdefault("state", {})
            state[AUTHENTICATED_BY], state[API_CLIENT] = "token", verdict.client
            return None
        return _refusal(verdict) or _unauthorized()

    async def _authenticate_dicomweb(
        self, scope: Scope, headers: Headers, address: str
    ) -> Response | None:
        if scope["method"] == "OPTIONS":
            return None  # a CORS preflight: never carries credentials
        state = scope.setdefault("state", {})
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            verdict = await self.gate.check_token(address, token.strip(), dicomweb=True)
            if not verdict.ok:
                return _refusal(verdict) or _unauthorized()
            state[AUTHENTICATED_BY], state[DICOMWEB_CLIENT] = "token", verdict.client
            return None
        if scope["method"] in SESSION_METHODS and self.gate.session_live(
            scope.get("session") or {}
        ):
            state[AUTHENTICATED_BY], state[DICOMWEB_CLIENT] = "session", DASHBOARD_CLIENT
            return None
        return _unauthorized()

    # -- how much -------------------------------------------------------------------------

    async def _bounded_body(
        self, scope: Scope, headers: Headers, receive: Receive
    ) -> tuple[Response | None, Receive]:
        streamed = scope["method"] == "POST" and STOW_PATH.fullmatch(scope["path"]) is not None
        limit = self._limit(scope["path"], streamed)
        lengths = {_length(value) for value in headers.getlist("content-length")}
        if None in lengths or len(lengths) > 1:
            return PlainTextResponse("invalid Content-Length", 400), receive
        if any(length is not None and length > limit for length in lengths):
            return _too_large(limit), receive  # declared too large: refused unread
        if not _declares_body(headers):
            return None, receive
        if streamed:
            return None, _counted(receive, limit)
        chunks = await _read_at_most(receive, limit)
        if chunks is None:
            return _too_large(limit), receive
        return None, _replay(chunks, receive)

    def _limit(self, path: str, streamed: bool) -> int:
        if streamed:
            return self.stow_bytes
        return self.upload_bytes if path in UPLOAD_ROUTES else self.form_bytes


def _declares_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or (_length(headers.get("content-length")) or 0) > 0


def _length(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


async def _read_at_most(receive: Receive, limit: int) -> list[bytes] | None:
    """The body's chunks, or None as soon as they add up to more than `limit` bytes. Held in
    memory (at most `limit`), so nothing past the limit, and nothing refused, is written."""
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks


def _counted(receive: Receive, limit: int) -> Receive:
    """The body as the route reads it, counted: BodyOverLimit once past `limit` bytes."""
    total = 0

    async def counted() -> Message:
        nonlocal total
        message = await receive()
        total += len(message.get("body", b""))
        if total > limit:
            raise BodyOverLimit(limit)
        return message

    return counted


def _replay(chunks: list[bytes], receive: Receive) -> Receive:
    """The body as it came, then whatever the server says next (a disconnect)."""
    pending = deque(chunks)

    async def replayed() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.popleft(), "more_body": bool(pending)}
        return await receive()

    return replayed


def _too_large(limit: int) -> Response:
    return PlainTextResponse(f"request body over this route's {_size(limit)} limit", 413)


def _size(limit: int) -> str:
    return f"{limit // 2**20} MB" if limit >= 2**20 else f"{limit // 2**10} KB"


def _unauthorized() -> Response:
    return JSONResponse(
        {"detail": "authentication required"}, 401, headers={"WWW-Authenticate": "Bearer"}
    )


def _refusal(verdict: Verdict | None) -> Response | None:
    """429 for a locked-out address, 503 when every check worker is busy; None otherwise."""
    if verdict is None or verdict.outcome not in (Outcome.locked_out, Outcome.busy):
        return None
    text = (
        f"too many failed logins or tokens from this address: try again in "
        f"{verdict.retry_after_s} s"
        if verdict.outcome is Outcome.locked_out
        else "busy checking other logins: try again in a moment"
    )
    status = 429 if verdict.outcome is Outcome.locked_out else 503
    return PlainTextResponse(text, status, headers={"Retry-After": str(verdict.retry_after_s)})
