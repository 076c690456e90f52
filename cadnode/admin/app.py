"""The admin port (FastAPI): health, readiness, metrics and the dashboard.

/healthz and /readyz answer anyone (probes; they carry no patient data). /metrics needs the
bearer token or a logged-in browser; every dashboard page needs the login (cadnode.admin.auth),
checked by the guard (cadnode.admin.guard) before any request body is read.
"""

from __future__ import annotations

import secrets
import ssl
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cadnode import __version__
from cadnode.admin import feedback_pages, metrics, views
from cadnode.admin.auth import SESSION_COOKIE, Gate, NotLoggedIn
from cadnode.admin.context import AdminContext
from cadnode.admin.guard import Guard
from cadnode.admin.health import readiness
from cadnode.feedback.api import feedback_router
from cadnode.ingest.stow import stow_router
from cadnode.serve import dicomweb

log = structlog.get_logger("cadnode.admin")

# No script anywhere, nothing from elsewhere, and never framed by another site.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


def create_app(context: AdminContext) -> FastAPI:
    http = context.settings.http
    gate = Gate(
        http, context.database, context.settings.dicomweb, context.settings.feedback.api_clients
    )
    app = FastAPI(title="cadnode", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.context = context
    app.state.gate = gate
    # Added first, so innermost: it sees the session the session middleware decoded, and
    # runs before any route reads a body.
    app.add_middleware(Guard, gate=gate, settings=http, dicomweb=context.settings.dicomweb)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secrets.token_urlsafe(32),
        session_cookie=SESSION_COOKIE,
        max_age=http.session_max_age_s,
        same_site="strict",
        https_only=gate.secure_cookie,
    )
    app.add_middleware(_SecurityHeaders)
    # Outermost: a CORS preflight is answered before the guard, a refusal gets CORS headers.
    app.add_middleware(dicomweb.Cors, origins=context.settings.dicomweb.cors_origins)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")

    @app.exception_handler(NotLoggedIn)
    def to_login(request: Request, _error: NotLoggedIn) -> RedirectResponse:
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        report = readiness(context)
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @app.get("/metrics")
    def metrics_endpoint(request: Request) -> Response:
        gate.api(request)
        return Response(metrics.render(context), media_type=metrics.CONTENT_TYPE)

    app.include_router(views.router)
    app.include_router(feedback_pages.router)  # agree / disagree, the performance page
    app.include_router(stow_router(context))  # STOW-RS: POST /dicomweb/studies[/{study}]
    app.include_router(feedback_router(context))  # a RIS's conclusions: POST /api/feedback
    app.include_router(dicomweb.router)
    return app


class _SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


class AdminServer:
    def __init__(self, context: AdminContext) -> None:
        http = context.settings.http
        options: dict[str, Any] = {}
        if http.tls is not None:
            options = {"ssl_certfile": str(http.tls.certificate),
                       "ssl_keyfile": str(http.tls.private_key)}
        if http.tls is not None and http.tls.client_ca is not None:  # mutual TLS
            options |= {"ssl_ca_certs": str(http.tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        app = create_app(context)
        self._gate: Gate = app.state.gate
        config = uvicorn.Config(
            app,
            host=http.bind,
            port=http.port,
            log_level="warning",
            access_log=False,  # request lines may carry study UIDs; the audit trail has actions
            **options,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="admin-http", daemon=True)
        self.context = context

    def start(self) -> None:
        self._thread.start()
        http = self.context.settings.http
        log.info(
            "admin.listening",
            bind=http.bind,
            port=http.port,
            tls=http.tls is not None,
            dashboard=bool(http.admin_password_hash),
        )
        if not (http.admin_password_hash or http.admin_token_hash):
            log.warning("admin.no_credentials", hint="set http.admin_password_hash to log in")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._gate.close()
