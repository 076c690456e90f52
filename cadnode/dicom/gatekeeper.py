"""Connections before their association request: one thread for all, a deadline for each.

pynetdicom gives every accepted connection two threads and counts it against the maximum
number of associations from the moment it is accepted, so peers that connect and send
nothing (or a byte now and then) could hold every slot. Here a connection waits, without a
thread, until its whole A-ASSOCIATE-RQ has arrived:

- one deadline from accept to the request's last byte (`dicom.acse_timeout_s`), however
  the bytes trickle in; the DICOM TLS handshake runs under the same deadline;
- the request may be at most `dicom.max_request_pdu_kb` long (an A-ABORT past it), and its
  buffer grows with the bytes that arrive, never to the length a peer declares;
- at most `dicom.max_pending_per_address` connections from one address, and
  `dicom.max_pending` in all, wait at once: past either, the one waiting longest is closed
  (an honest modality sends its request as soon as it connects);
- a complete request is handed to pynetdicom (the bytes read travel with the socket, see
  cadnode/dicom/pdu.py PduReader) only while fewer than `dicom.max_associations`
  associations run; otherwise it is answered A-ASSOCIATE-RJ (transient, local limit
  exceeded) from here, so a flood of requests costs no threads either.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from cadnode.dicom.pdu import ABORT_INVALID_PARAMETER

log = structlog.get_logger("cadnode.dicom.gatekeeper")

A_ASSOCIATE_RQ = 0x01
# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-transient, service-provider (presentation related
# function), local-limit-exceeded.
REJECT_LIMIT_EXCEEDED = b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"
# A-ABORT: service-provider, unexpected PDU (anything but a request before association).
ABORT_UNEXPECTED_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02"
READ_CHUNK = 64 * 1024
SWEEP_S = 0.5

# (peer address, calling AE title or "", reason): receive logs and audits it.
RefusalHook = Callable[[tuple[Any, ...], str, str], None]


@dataclass(frozen=True)
class GateLimits:
    request_timeout_s: float
    max_request_bytes: int
    max_pending_per_address: int
    max_pending: int
    max_associations: int


@dataclass(eq=False)
class _Waiting:
    sock: socket.socket
    address: tuple[Any, ...]
    deadline: float
    handshaking: bool
    buffer: bytearray = field(default_factory=bytearray)
    needed: int = 6  # bytes of the request to have: its header, then header and body

    @property
    def host(self) -> str:
        return str(self.address[0])


class Gatekeeper:
    """Holds accepted connections until their association request is whole (see above).

    `hand_over(sock, address, request)` gives a complete request to the DICOM stack;
    `running()` says how many associations it runs now.
    """

    def __init__(
        self,
        limits: GateLimits,
        hand_over: Callable[[socket.socket, tuple[Any, ...], bytes], None],
        running: Callable[[], int],
        on_refused: RefusalHook,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.limits = limits
        self.hand_over = hand_over
        self.running = running
        self.on_refused = on_refused
        self.ssl_context = ssl_context
        self._selector = selectors.DefaultSelector()
        self._arrivals: queue.SimpleQueue[tuple[socket.socket, tuple[Any, ...]]]
        self._arrivals = queue.SimpleQueue()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._waiting: dict[socket.socket, _Waiting] = {}  # in order of arrival
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="receive-gatekeeper", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        """A connection just accepted (from the accepting thread)."""
        self._arrivals.put((sock, address))
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is already pending
            self._wake_writer.send(b"!")

    def close(self) -> None:
        """Close every waiting connection and stop the thread."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"!")
        self._thread.join(5)

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                for key, _mask in self._selector.select(self._until_next_deadline()):
                    if key.data is None:
                        self._take_arrivals()
                    else:
                        self._advance(key.data)
                self._expire()
        except Exception:  # never leave the port deaf without saying so
            log.exception("gatekeeper.failed")
            raise
        finally:
            for waiting in list(self._waiting.values()):
                self._close(waiting)
            self._selector.close()
            self._wake_reader.close()
            self._wake_writer.close()

    def _until_next_deadline(self) -> float:
        if not self._waiting:
            return SWEEP_S
        soonest = min(w.deadline for w in self._waiting.values())
        return max(0.0, min(SWEEP_S, soonest - time.monotonic()))

    def _take_arrivals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_reader.recv(4096):
                pass
        while True:
            try:
                sock, address = self._arrivals.get_nowait()
            except queue.Empty:
                return
            self._make_room(str(address[0]))
            self._start_waiting(sock, address)

    def _make_room(self, host: str) -> None:
        """Close the longest-waiting connections past the per-address and overall caps."""
        from_host = [w for w in self._waiting.values() if w.host == host]
        if len(from_host) >= self.limits.max_pending_per_address:
            self._evict(from_host[0], "more connections from this address await association")
        if len(self._waiting) >= self.limits.max_pending:
            oldest = next(iter(self._waiting.values()))
            self._evict(oldest, "too many connections await association")

    def _evict(self, waiting: _Waiting, reason: str) -> None:
        log.warning("connection.evicted", peer=_peer(waiting.address), reason=reason)
        self._close(waiting)

    def _start_waiting(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        sock.setblocking(False)
        handshaking = self.ssl_context is not None
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        deadline = time.monotonic() + self.limits.request_timeout_s
        waiting = _Waiting(sock, address, deadline, handshaking)
        self._waiting[sock] = waiting
        self._selector.register(sock, selectors.EVENT_READ, waiting)

    def _advance(self, waiting: _Waiting) -> None:
        try:
            if waiting.handshaking and not self._handshake(waiting):
                return
            self._read(waiting)
        except (OSError, ValueError) as error:  # reset, TLS failure: that peer's problem only
            log.info("connection.failed", peer=_peer(waiting.address), error=str(error))
            self._close(waiting)

    def _handshake(self, waiting: _Waiting) -> bool:
        assert isinstance(waiting.sock, ssl.SSLSocket)
        try:
            waiting.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(waiting.sock, selectors.EVENT_READ, waiting)
            return False
        except ssl.SSLWantWriteError:
            self._selector.modify(waiting.sock, selectors.EVENT_WRITE, waiting)
            return False
        waiting.handshaking = False
        self._selector.modify(waiting.sock, selectors.EVENT_READ, waiting)
        return True

    def _read(self, waiting: _Waiting) -> None:
        while len(waiting.buffer) < waiting.needed:
            try:
                chunk = waiting.sock.recv(min(READ_CHUNK, waiting.needed - len(waiting.buffer)))
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            if not chunk:  # a port probe, or a peer that gave up
                log.info("connection.closed_before_request", peer=_peer(waiting.address))
                self._close(waiting)
                return
            waiting.buffer += chunk
            if len(waiting.buffer) == 6 and not self._header_allowed(waiting):
                return
        self._request_complete(waiting)

    def _header_allowed(self, waiting: _Waiting) -> bool:
        pdu_type, _, length = struct.unpack(">BBL", waiting.buffer)
        if pdu_type != A_ASSOCIATE_RQ:
            reason = f"PDU type 0x{pdu_type:02X} before an association request"
            self._refuse(waiting, ABORT_UNEXPECTED_PDU, reason)
            return False
        if length > self.limits.max_request_bytes:
            reason = (
                f"association request of {length} bytes, over dicom.max_request_pdu_kb"
                f" ({self.limits.max_request_bytes} bytes)"
            )
            self._refuse(waiting, ABORT_INVALID_PARAMETER, reason)
            return False
        waiting.needed = 6 + length
        return True

    def _request_complete(self, waiting: _Waiting) -> None:
        if self.running() >= self.limits.max_associations:
            reason = f"dicom.max_associations ({self.limits.max_associations}) already run"
            self._refuse(waiting, REJECT_LIMIT_EXCEEDED, reason)
            return
        self._forget(waiting)
        sock = waiting.sock
        try:
            sock.setblocking(True)
            self.hand_over(sock, waiting.address, bytes(waiting.buffer))
        except Exception:
            log.exception("connection.hand_over_failed", peer=_peer(waiting.address))
            _shut(sock)

    def _refuse(self, waiting: _Waiting, answer: bytes, reason: str) -> None:
        calling_ae = _calling_ae(waiting.buffer)
        log.warning(
            "association.refused", peer=_peer(waiting.address), calling_ae=calling_ae, reason=reason
        )
        with contextlib.suppress(OSError):
            waiting.sock.send(answer)  # non-blocking: a peer not reading gets nothing
        self._close(waiting)
        with contextlib.suppress(Exception):  # auditing must not stop the gate
            self.on_refused(waiting.address, calling_ae, reason)

    def _expire(self) -> None:
        now = time.monotonic()
        for waiting in [w for w in self._waiting.values() if w.deadline <= now]:
            log.warning(
                "connection.timed_out",
                peer=_peer(waiting.address),
                received=len(waiting.buffer),
                tls_handshake=waiting.handshaking,
                after_s=self.limits.request_timeout_s,
            )
            self._close(waiting)

    def _forget(self, waiting: _Waiting) -> None:
        self._waiting.pop(waiting.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(waiting.sock)

    def _close(self, waiting: _Waiting) -> None:
        self._forget(waiting)
        _shut(waiting.sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _calling_ae(request: bytearray) -> str:
    """The calling AE title of an A-ASSOCIATE-RQ's fixed fields (PS3.8 9.3.2), if it came."""
    if len(request) < 42 or request[0] != A_ASSOCIATE_RQ:
        return ""
    return bytes(request[26:42]).decode("ascii", "replace").strip()


def _peer(address: tuple[Any, ...]) -> str:
    return f"{address[0]}:{address[1]}"
