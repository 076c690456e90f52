"""The admin's HTTP endpoint (FastAPI, on the configured HTTP port).

For now only liveness: `GET /healthz`. The dashboard, metrics and authenticated admin
actions are not built yet.
"""

from __future__ import annotations

import threading

import structlog
import uvicorn
from fastapi import FastAPI

from cadnode import __version__
from cadnode.config import HttpSettings

log = structlog.get_logger("cadnode.admin")


def create_app() -> FastAPI:
    app = FastAPI(title="cadnode", version=__version__)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app


class AdminServer:
    def __init__(self, settings: HttpSettings) -> None:
        config = uvicorn.Config(
            create_app(),
            host=settings.bind,
            port=settings.port,
            log_level="warning",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="admin-http", daemon=True)
        self.settings = settings

    def start(self) -> None:
        self._thread.start()
        log.info("admin.listening", bind=self.settings.bind, port=self.settings.port)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
