"""DICOM network helpers shared by the stages that speak DIMSE (receive, dispatch)."""

from __future__ import annotations

import socket
from typing import Any


def set_tcp_nodelay(event: Any) -> None:
    """Send each PDU at once: Nagle's algorithm stalls DIMSE's small request/response turns.

    Bound to pynetdicom's EVT_CONN_OPEN, for both accepted and requested associations.
    """
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def status_is_success(status: int) -> bool:
    """Success, or a warning (0x0001, 0xB000-0xBFFF) under which the peer kept the object."""
    return status == 0x0000 or status == 0x0001 or 0xB000 <= status <= 0xBFFF
