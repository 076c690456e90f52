"""STOW-RS bodies meant to exhaust the node: each is bounded and answered.

A chunked body that never ends is cut (413) where it passes `dicomweb.max_request_mb`, its
endless part refused past `dicomweb.max_part_mb` without being stored; a body whose last
boundary never comes is answered 400 and nothing of its cut part is kept; a client that
stops sending is cut off after `dicomweb.read_timeout_s` (408).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cadnode.admin.auth import hash_password
from tests.hostile.node import attacked_node
from tests.peers import Cadnode, port_open, wait_for
from tests.synthetic import write_ct_series

TOKEN = "hostile-stow-token-" + "y" * 20
BOUNDARY = b"hostile"
PART_START = b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n\r\n"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cadnode]:
    dicomweb = {
        "clients": {"HOSTILE": hash_password(TOKEN)},
        "max_request_mb": 8,
        "max_part_mb": 2,
        "read_timeout_s": 1,
    }
    with attacked_node(tmp_path_factory.mktemp("stow"), dicomweb=dicomweb) as cadnode:
        wait_for(lambda: port_open(cadnode.http_port), 30, "the node's HTTP port")
        yield cadnode


def _headers(node: Cadnode, framing: str) -> bytes:
    lines = [
        "POST /dicomweb/studies HTTP/1.1",
        f"Host: 127.0.0.1:{node.http_port}",
        f"Authorization: Bearer {TOKEN}",
        f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}',
        framing,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status(sock: socket.socket) -> int:
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(65536)
        assert chunk, "the node closed the connection without an answer"
        answer += chunk
    return int(answer.split(b" ", 2)[1])


def _scratch_left(node: Cadnode) -> list[Path]:
    return list((node.data_dir / "spool").glob(".stow-*"))


def test_a_never_ending_chunked_body_is_cut_at_the_limit(node: Cadnode) -> None:
    chunk = b"\x00" * 2**20
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent = [0]

    def flood(sock: socket.socket) -> None:
        try:
            while sent[0] < 64 * 2**20:  # far past the limit: the node must have stopped it
                sock.sendall(framed)
                sent[0] += len(chunk)
        except OSError:
            pass  # the node closed its end after answering

    with socket.create_connection(("127.0.0.1", node.http_port), timeout=30) as sock:
        sock.sendall(_headers(node, "Transfer-Encoding: chunked"))
        sock.sendall(b"%x\r\n%s\r\n" % (len(PART_START), PART_START))
        # Sent from another thread, the answer read here as soon as it comes: before the
        # node's close of a connection with unread data resets it.
        sender = threading.Thread(target=flood, args=(sock,), daemon=True)
        sender.start()
        assert _status(sock) == 413
        sender.join(30)
    assert sent[0] < 64 * 2**20
    assert _scratch_left(node) == []


def test_a_body_without_its_last_boundary_is_400(node: Cadnode, tmp_path: Path) -> None:
    [path] = write_ct_series(tmp_path, 1, size=32, seed=41)
    body = PART_START + path.read_bytes()  # and no closing boundary
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=30) as sock:
        sock.sendall(_headers(node, f"Content-Length: {len(body)}") + body)
        assert _status(sock) == 400
    assert _scratch_left(node) == []
    assert list((node.data_dir / "spool").rglob("*.dcm")) == []  # the cut part: not kept


def test_a_client_that_stops_sending_is_cut_off(node: Cadnode) -> None:
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=30) as sock:
        sock.sendall(_headers(node, "Content-Length: 100000") + PART_START)
        assert _status(sock) == 408  # answered once read_timeout_s passed without data
