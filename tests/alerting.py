"""The watchdog tests' webhook receiver: a real HTTP server on loopback that keeps what it is
sent."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar


class Hooked(BaseHTTPRequestHandler):
    """Keeps each POST's headers and JSON body; answers `answer`."""

    received: ClassVar[list[tuple[dict[str, str], dict[str, Any]]]]
    answer: ClassVar[int] = 204

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), json.loads(body)))
        self.send_response(self.answer)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, type[Hooked]]]:
    """(its URL, the handler class whose `received` fills up)."""
    handler = type("Receiver", (Hooked,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    finally:
        server.shutdown()
        server.server_close()
