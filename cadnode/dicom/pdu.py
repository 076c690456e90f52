"""Reading a peer's PDUs within limits, for every association the node accepts or requests."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass, replace
from typing import Any

import structlog
from pynetdicom.transport import AssociationSocket

log = structlog.get_logger("cadnode.dicom.pdu")


# A-ABORT (PS3.8 9.3.8): source service-provider, reason invalid-PDU-parameter-value.
ABORT_INVALID_PARAMETER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
P_DATA_TF = 0x04
PDU_TYPES = range(0x01, 0x08)
# Before a buffer is grown to what a PDU declares, this much must have arrived.
FIRST_CHUNK = 256 * 1024
# An outbound association's PDUs when it set no maximum of its own (0: unlimited).
UNLIMITED_PDU_CAP = 64 * 2**20


@dataclass(frozen=True)
class PduLimits:
    """What one PDU from a peer may cost: its length, and the time its bytes may take."""

    timeout_s: float  # first byte to last, not per read
    other_pdu_bytes: int  # association requests, answers, releases, aborts
    data_pdu_bytes: int | None = None  # P-DATA-TF; None: the maximum this side negotiated


def tune_connection(event: Any, limits: PduLimits | None = None) -> None:
    """Bound to pynetdicom's EVT_CONN_OPEN, for both accepted and requested associations.

    - TCP_NODELAY: send each PDU at once (Nagle's algorithm stalls DIMSE's small
      request/response turns).
    - PDUs are read by a `PduReader`: whole (pynetdicom reads 4 KiB per recv()), bounded in
      length by what this side negotiated, and in time by one deadline per PDU.
    `limits` unset (outbound associations): the association's network timeout per PDU.
    """
    association = event.assoc
    connection = association.dul.socket
    sock = connection.socket
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ours = association.acceptor if association.is_acceptor else association.requestor
    if limits is None:
        limits = PduLimits(float(association.network_timeout or 60), UNLIMITED_PDU_CAP)
    if limits.data_pdu_bytes is None:
        negotiated = int(ours.maximum_length or 0) or UNLIMITED_PDU_CAP
        limits = replace(limits, data_pdu_bytes=negotiated)
    # The server's gatekeeper may already have read the association request.
    received_before = getattr(getattr(association, "_server", None), "received_before", None)
    prefix = received_before(sock) if received_before is not None else b""
    reader = PduReader(sock, limits, peer=_peer_of(association), prefix=prefix)
    connection.__class__ = _GuardedSocket
    connection.reader = reader


class PduReader:
    """PDUs for pynetdicom's DUL, which asks for a PDU's 6-byte header, then for the rest.

    A peer's declared length is never allocated on trust: a length over the limit is answered
    with an A-ABORT, and the buffer grows with the bytes that actually arrive. All of one
    PDU's bytes must arrive before its deadline, however slowly they trickle. `prefix`: bytes
    the server already read (the association request, see cadnode/dicom/gatekeeper.py).
    """

    def __init__(
        self, sock: socket.socket, limits: PduLimits, peer: str = "", prefix: bytes = b""
    ) -> None:
        self.sock = sock
        self.limits = limits
        self.peer = peer
        self.prefix = bytearray(prefix)
        self.network_timeout = sock.gettimeout()
        self._deadline = 0.0
        self._in_body = False  # the header was read; the DUL asks for the body next
        self._refused = False

    def recv(self, size: int) -> bytearray:
        """`size` bytes, or fewer if the peer closed the connection first (as pynetdicom's own
        recv returns); an empty body after a refused header, so the DUL closes."""
        if self._refused:
            return bytearray()
        reading_header = size == 6 and not self._in_body
        if reading_header:
            self._deadline = time.monotonic() + self.limits.timeout_s
        data = self._read(size)
        if reading_header and len(data) == 6:
            self._check_header(data)
        else:
            self._in_body = False
        return data

    def _check_header(self, header: bytearray) -> None:
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in PDU_TYPES:
            return  # the DUL aborts an unknown PDU itself, reading no body
        limit = self.limits.other_pdu_bytes
        if pdu_type == P_DATA_TF and self.limits.data_pdu_bytes is not None:
            limit = self.limits.data_pdu_bytes
        if length > limit:
            self._refuse(pdu_type, length, limit)
            return
        self._in_body = True

    def _refuse(self, pdu_type: int, length: int, limit: int) -> None:
        log.warning(
            "association.pdu_too_long",
            peer=self.peer,
            pdu_type=pdu_type,
            length=length,
            limit=limit,
        )
        with contextlib.suppress(OSError):
            self.sock.sendall(ABORT_INVALID_PARAMETER)
        self._refused = True

    @property
    def buffered(self) -> bool:
        return bool(self.prefix)

    def _read(self, size: int) -> bytearray:
        data = self._from_prefix(size)
        if len(data) == size:
            return data
        try:
            return self._from_socket(data, size)
        except TimeoutError:
            log.warning("association.pdu_timeout", peer=self.peer, after_s=self.limits.timeout_s)
            raise
        finally:
            self.sock.settimeout(self.network_timeout)

    def _from_prefix(self, size: int) -> bytearray:
        data = self.prefix[:size]
        del self.prefix[:size]
        return data

    def _from_socket(self, buffer: bytearray, size: int) -> bytearray:
        received = len(buffer)
        while received < size:
            if received == len(buffer):  # grow with what arrived, never to the claim at once
                buffer.extend(bytes(min(size, max(FIRST_CHUNK, 2 * received)) - received))
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the PDU did not arrive within its deadline")
            self.sock.settimeout(min(remaining, self.network_timeout or remaining))
            with memoryview(buffer) as view:
                count = self.sock.recv_into(view[received:])
            if not count:
                break
            received += count
        del buffer[received:]
        return buffer


class _GuardedSocket(AssociationSocket):
    """pynetdicom's socket, reading through a PduReader (see tune_connection)."""

    reader: PduReader

    @property
    def ready(self) -> bool:
        return self.reader.buffered or bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        return self.reader.recv(nr_bytes)


def _peer_of(association: Any) -> str:
    requestor = association.requestor if association.is_acceptor else association.acceptor
    try:
        return f"{requestor.address}:{requestor.port}"
    except Exception:  # an outbound association before its peer is known
        return ""
