"""Where the node's DICOMweb service lives, as a client reached it: one answer for every URL
the node hands out (STOW-RS Retrieve URLs, QIDO-RS Retrieve URLs, WADO-RS BulkDataURIs)."""

from __future__ import annotations

from starlette.requests import Request

PREFIX = "/dicomweb"


def service_root(request: Request) -> str:
    """The service's root URL from the request's Host header, with the port the node listens
    on where the header names none (as dicomweb-client sends it) and it is not the scheme's
    default."""
    url = request.base_url
    server = request.scope.get("server")
    if url.port is None and server and server[1] not in (80, 443):
        url = url.replace(port=int(server[1]))
    return str(url).rstrip("/") + PREFIX
