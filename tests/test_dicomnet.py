"""Whole-PDU reads (cadnode/dicomnet.py `read_exactly`), installed on every association."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from cadnode.dicomnet import read_exactly


def test_a_pdu_arriving_in_pieces_is_read_whole() -> None:
    reader, writer = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB, more than one socket buffer

    def send_in_pieces() -> None:
        for start in range(0, len(payload), 100_000):
            writer.sendall(payload[start : start + 100_000])
            time.sleep(0.002)

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    try:
        assert read_exactly(reader, len(payload)) == payload
    finally:
        sender.join()
        reader.close()
        writer.close()


def test_a_peer_closing_mid_pdu_gives_what_came_as_pynetdicom_expects() -> None:
    reader, writer = socket.socketpair()
    writer.sendall(b"\x04\x00\x00\x00")
    writer.close()
    try:
        assert read_exactly(reader, 4096) == b"\x04\x00\x00\x00"
    finally:
        reader.close()


def test_a_peer_stalling_mid_pdu_hits_the_socket_deadline() -> None:
    reader, writer = socket.socketpair()
    reader.settimeout(0.2)  # receive sets the network timeout on every accepted socket
    writer.sendall(b"\x04\x00")
    try:
        with pytest.raises(TimeoutError):
            read_exactly(reader, 6)
    finally:
        reader.close()
        writer.close()
