"""Attacks on the DICOM port of a running node: declared PDU lengths, connections that never
ask for an association or trickle one in, a flood from one address; plain TCP and TLS.

Each attack holds at most ~50 connections for a few seconds and stops by itself; what it may
cost the node is asserted as a bound (docs/security.md).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from cadnode.dicom.pdu import ABORT_INVALID_PARAMETER
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.hostile.memory import peak_mb, reset_peak, resident_mb, threads
from tests.hostile.node import attacked_node
from tests.ingest import json_events, named
from tests.peers import Cadnode, echoscu, storescu, wait_for
from tests.test_ingest_tls import make_pki, storescu_tls

FOUR_GIB = 0xFFFFFFFF
T = TypeVar("T")


def header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def is_open(sock: socket.socket) -> bool:
    """Still connected: nothing to read, and no end of file from the node."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def timed(action: Callable[[], T]) -> tuple[float, T]:
    started = time.monotonic()
    result = action()
    return time.monotonic() - started, result


@pytest.fixture(scope="module")
def film(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("film") / "film.dcm"
    write_chest_radiograph(path, seed=141, size=256)
    return path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cadnode]:
    with attacked_node(tmp_path_factory.mktemp("port"), dicom={"acse_timeout_s": 30}) as running:
        yield running


@contextlib.contextmanager
def held_open(port: int, silent: int, trickling: int) -> Iterator[list[socket.socket]]:
    """`silent` connections that say nothing and `trickling` ones that send an association
    request one byte a second, each from its own loopback address (so no per-address cap
    closes them: they all stay waiting), until the block ends."""
    sockets = [connect(port, f"127.0.2.{n + 1}") for n in range(silent)]
    slow = [connect(port, f"127.0.3.{n + 1}") for n in range(trickling)]
    stop = threading.Event()

    def trickle() -> None:
        request = header(0x01, 1000) + b"\x00" * 1000
        for byte in range(len(request)):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(request[byte : byte + 1])
            if stop.wait(1.0):
                return

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        yield sockets + slow
    finally:
        stop.set()
        sender.join()
        for sock in sockets + slow:
            sock.close()


def test_declared_4_gib_pdus_are_aborted_and_cost_no_memory(node: Cadnode) -> None:
    before = resident_mb(node.process.pid)
    reset_peak(node.process.pid)
    attackers = [connect(node.dicom_port) for _ in range(3)]
    for sock in attackers:
        sock.sendall(header(0x01, FOUR_GIB))  # an association request "of 4 GiB"
    ae = AE(ae_title="ATTACKER")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", node.dicom_port, ae_title="CADNODE")
    assert association.is_established
    association.dul.socket.socket.sendall(header(0x04, FOUR_GIB))  # P-DATA-TF "of 4 GiB"
    try:
        for sock in attackers:
            sock.settimeout(10)
            assert sock.recv(100) == ABORT_INVALID_PARAMETER
        wait_for(lambda: association.is_aborted, 10, "the association to be aborted")
        growth = peak_mb(node.process.pid) - before
        echoed = echoscu(node.dicom_port)
    finally:
        association.abort()
        for sock in attackers:
            sock.close()
    assert growth < 50, f"the node grew by {growth:.0f} MB"
    assert echoed.returncode == 0, echoed.stderr
    events = json_events(node.log_text())
    assert len(named(events, "association.refused")) >= 3
    assert named(events, "association.pdu_too_long")


def test_silent_and_trickling_connections_hold_no_slot_and_no_thread(
    node: Cadnode, film: Path
) -> None:
    """40 silent and 8 trickling connections, more than `max_associations` (16): an honest
    modality's echo and store still go through at once."""
    before = threads(node.process.pid)
    with held_open(node.dicom_port, silent=40, trickling=8) as attackers:
        wait_for(lambda: threads(node.process.pid) >= before, 5, "the node to be measured")
        echo_s, echoed = timed(lambda: echoscu(node.dicom_port))
        store_s, stored = timed(lambda: storescu(node.dicom_port, film))
        grown = threads(node.process.pid) - before
        still_waiting = sum(is_open(sock) for sock in attackers)
    assert echoed.returncode == 0 and echo_s < 2, (echo_s, echoed.stderr)
    assert stored.returncode == 0 and store_s < 2, (store_s, stored.stderr)
    assert grown < 10, f"48 waiting connections cost {grown} threads"
    assert still_waiting == 48, "no waiting connection should have been closed yet"


def test_a_request_trickling_in_is_closed_at_its_deadline(tmp_path: Path) -> None:
    with (
        attacked_node(tmp_path, dicom={"acse_timeout_s": 2}) as node,
        held_open(node.dicom_port, silent=1, trickling=1) as (silent, trickling),
    ):
        started = time.monotonic()
        wait_for(lambda: not is_open(silent) and not is_open(trickling), 10, "both to be closed")
        took = time.monotonic() - started
        wait_for(
            lambda: len(named(json_events(node.log_text()), "connection.timed_out")) == 2,
            10,
            "both closings logged",
        )
    # The default deadline is 30 s: closing within 10 is this one, even on a loaded machine.
    assert took < 10, f"closed after {took:.1f} s, the deadline is 2 s"


def test_one_address_cannot_hold_more_than_its_share(node: Cadnode) -> None:
    flood = [connect(node.dicom_port, "127.0.4.1") for _ in range(20)]
    try:
        wait_for(lambda: sum(is_open(s) for s in flood) <= 8, 10, "the oldest to be closed")
        assert [is_open(s) for s in flood][-8:] == [True] * 8, "the newest ones stay"
        echoed = echoscu(node.dicom_port)
    finally:
        for sock in flood:
            sock.close()
    assert echoed.returncode == 0, echoed.stderr
    assert len(named(json_events(node.log_text()), "connection.evicted")) >= 12


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_the_tls_port_is_held_to_the_same_deadlines_and_slots(
    tmp_path: Path, pki: Path, film: Path
) -> None:
    """Silent connections never start the handshake; trickling ones send a byte a second."""
    tls = {"certificate": str(pki / "cadnode.crt"), "private_key": str(pki / "cadnode.key")}
    with attacked_node(tmp_path, dicom={"tls": tls}) as node:
        before = threads(node.process.pid)
        with held_open(node.dicom_port, silent=40, trickling=8):
            store_s, stored = timed(
                lambda: storescu_tls(node.dicom_port, film, pki, client_certificate=False)
            )
            grown = threads(node.process.pid) - before
    assert "Received Store Response (Success)" in stored, stored
    assert store_s < 2, f"the TLS store took {store_s:.1f} s"
    assert grown < 10, f"48 waiting TLS connections cost {grown} threads"
