"""PDU reads (cadnode/dicom/pdu.py `PduReader`), installed on every association: whole PDUs,
a length limit checked before any allocation, one deadline per PDU."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from cadnode.dicom.pdu import ABORT_INVALID_PARAMETER, PduLimits, PduReader

LIMITS = PduLimits(timeout_s=5.0, other_pdu_bytes=64 * 1024, data_pdu_bytes=2 * 2**20)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    reader, writer = socket.socketpair()
    reader.settimeout(5.0)  # receive sets the network timeout on every accepted socket
    yield reader, writer
    reader.close()
    writer.close()


def header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def test_a_pdu_arriving_in_pieces_is_read_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    payload = bytes(range(256)) * 4096  # 1 MiB, more than one socket buffer

    def send_in_pieces() -> None:
        data = header(0x04, len(payload)) + payload
        for start in range(0, len(data), 100_000):
            writer.sendall(data[start : start + 100_000])
            time.sleep(0.002)

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    try:
        pdu = PduReader(reader, LIMITS)
        assert pdu.recv(6) == header(0x04, len(payload))
        assert pdu.recv(len(payload)) == payload
    finally:
        sender.join()


def test_a_peer_closing_mid_pdu_gives_what_came_as_pynetdicom_expects(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    writer.sendall(header(0x04, 4096) + b"\x01\x02")
    writer.close()
    pdu = PduReader(reader, LIMITS)
    pdu.recv(6)
    assert pdu.recv(4096) == b"\x01\x02"


def test_a_data_pdu_over_the_negotiated_maximum_is_aborted_unallocated(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    writer.sendall(header(0x04, 0xFFFFFFFF))  # 4 GiB declared
    pdu = PduReader(reader, LIMITS, peer="test")
    assert pdu.recv(6) == header(0x04, 0xFFFFFFFF)  # the DUL sees the header ...
    assert pdu.recv(0xFFFFFFFF) == b""  # ... and a body cut short: it closes the transport
    writer.settimeout(2)
    assert writer.recv(100) == ABORT_INVALID_PARAMETER  # the peer was told why


def test_other_pdus_have_their_own_smaller_limit(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    writer.sendall(header(0x01, 1024 * 1024))  # a 1 MiB association request
    pdu = PduReader(reader, LIMITS)
    pdu.recv(6)
    assert pdu.recv(1024 * 1024) == b""


def test_a_pdu_trickling_in_is_cut_off_at_its_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Every read is quick (a byte comes every 0.1 s), but the PDU as a whole is late."""
    reader, writer = pair
    stop = threading.Event()

    def trickle() -> None:
        writer.sendall(header(0x04, 1000))
        while not stop.wait(0.1):
            writer.sendall(b"x")

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        pdu = PduReader(reader, PduLimits(timeout_s=0.5, other_pdu_bytes=1024))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            pdu.recv(6)
            pdu.recv(1000)
        assert time.monotonic() - started < 3.0
    finally:
        stop.set()
        sender.join()


def test_bytes_already_read_by_the_server_come_first(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    request = header(0x01, 4) + b"abcd"
    writer.sendall(header(0x05, 4) + b"\x00\x00\x00\x00")  # then an A-RELEASE-RQ
    pdu = PduReader(reader, LIMITS, prefix=request)
    assert pdu.buffered
    assert pdu.recv(6) + pdu.recv(4) == request
    assert not pdu.buffered
    assert pdu.recv(6) == header(0x05, 4)
