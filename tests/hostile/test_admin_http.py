"""Attacks on the admin HTTP port of a real `cadnode serve`, each bounded in count and time.

Every attacker speaks from loopback; where a test needs many attackers (so that the
per-address failure limit cannot be what saves the node) each comes from its own address in
127.0.0.0/8, which Linux routes to the loopback interface.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from cadnode.admin.auth import hash_password, verify
from tests.hostile.memory import peak_mb, reset_peak, resident_mb
from tests.peers import REPO, Cadnode, port_open, run_cadnode, wait_for

PASSWORD = "hostile test password"
TOKEN = "hostile-test-scrape-token"
GIB = 2**30
MIB = 2**20


@contextmanager
def admin_node(folder: Path) -> Iterator[Cadnode]:
    """A node with a password and a token; its temp dir is its own, to be watched."""
    config = folder / "cadnode.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f"rules: {REPO / 'config' / 'rules.yaml'}\n"
        f"engines: {{dir: {REPO / 'engines'}}}\n"
        "storage: {min_free_mb: 1}\n"
        f"http: {{admin_password_hash: '{hash_password(PASSWORD)}',"
        f" admin_token_hash: '{hash_password(TOKEN)}'}}\n"
    )
    tmpdir = folder / "tmp"
    tmpdir.mkdir()
    with run_cadnode(folder / "node", None, CADNODE_CONFIG=str(config), TMPDIR=str(tmpdir)) as node:
        wait_for(lambda: port_open(node.http_port), 60, "the admin port")
        yield node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cadnode]:
    with admin_node(tmp_path_factory.mktemp("admin-http")) as cadnode:
        yield cadnode


def address(test: int, index: int) -> str:
    """Attacker `index` of test `test`: its own loopback address."""
    return f"127.{test}.{index // 250}.{index % 250 + 1}"


def client(node: Cadnode, source: str = "127.0.0.1") -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{node.http_port}",
        transport=httpx.HTTPTransport(local_address=source),
        timeout=60,
        follow_redirects=False,
    )


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no CSRF token in the page"
    return match[1]


def log_in(http: httpx.Client, password: str = PASSWORD) -> httpx.Response:
    token = csrf_of(http.get("/login").text)
    return http.post("/login", data={"password": password, "csrf": token, "next": "/studies"})


def admin_events(node: Cadnode) -> list[dict[str, Any]]:
    done = node.cli("audit", "--since", "1h", "--kind", "admin")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


# -- a gigabyte upload ----------------------------------------------------------------------


class TempWatch:
    """The largest file the node holds open under `folder` (deleted ones included, as
    tempfile's are), sampled from /proc/PID/fd until stopped."""

    def __init__(self, pid: int, folder: Path) -> None:
        self.pid, self.folder = pid, str(folder)
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> TempWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.largest = max(self.largest, self._open_bytes())

    def _open_bytes(self) -> int:
        largest = 0
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                if os.readlink(fd).startswith(self.folder):
                    largest = max(largest, os.stat(fd).st_size)
            except OSError:  # closed between the listing and the look
                continue
        return largest


def stream_upload(
    port: int, path: str, *, total: int, chunked: bool, within_s: float, cookie: str = ""
) -> tuple[int | None, int]:
    """POST a multipart body of `total` bytes (a file part of zeros) as fast as the server
    takes it, until it answers, closes, or `within_s` runs out: (status or None, bytes sent)."""
    boundary = "hostileboundary"
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    framing += f"\r\nCookie: {cookie}" if cookie else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n{framing}\r\n\r\n"
    ).encode()
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.dcm"\r\n'
        "Content-Type: application/dicom\r\n\r\n"
    ).encode()
    zeros = bytes(MIB)
    deadline = time.monotonic() + within_s
    with socket.create_connection(("127.0.0.1", port), timeout=within_s) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        sent, answer = 0, b""
        pending = memoryview(_frame(part, chunked))
        while time.monotonic() < deadline and b"\r\n" not in answer:
            left = deadline - time.monotonic()
            writers = [sock] if sent < total else []
            readable, writable, _ = select.select([sock], writers, [], max(left, 0))
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                answer += data
            elif writable:
                try:
                    count = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent, pending = sent + count, pending[count:]
                if not pending:
                    pending = memoryview(_frame(zeros, chunked))
    match = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    return (int(match[1]) if match else None), sent


def _listing(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in folder.iterdir()}


def _frame(data: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize("logged_in", [False, True], ids=["anonymous", "logged-in"])
def test_a_gigabyte_upload_never_reaches_the_disk(
    node: Cadnode, chunked: bool, logged_in: bool
) -> None:
    cookie = ""
    if logged_in:  # past the login, the body limit (64 MB) is what stops it
        with client(node, address(1, 0)) as http:
            assert log_in(http).status_code == 303
            cookie = f"cadnode_session={http.cookies['cadnode_session']}"
    tmpdir = node.log_path.parent.parent / "tmp"
    before = _listing(tmpdir)
    started = time.monotonic()
    with TempWatch(node.process.pid, tmpdir) as watch:
        status, sent = stream_upload(
            node.http_port,
            "/rules/explain",
            total=GIB,
            chunked=chunked,
            within_s=60,
            cookie=cookie,
        )
    elapsed = time.monotonic() - started
    print(f"answered {status} after {elapsed:.2f} s, {sent / MIB:.0f} MiB sent")
    taken = f"{sent / MIB:.0f} MiB sent, {watch.largest / MIB:.0f} MiB in a temp file"
    assert status in ((413,) if logged_in else (303, 401, 413)), (
        f"answered {status} after {elapsed:.1f} s; {taken}"
    )
    assert elapsed < 10, f"answered after {elapsed:.1f} s"
    assert sent < 128 * MIB, f"the node took {sent / MIB:.0f} MiB before answering"
    assert watch.largest == 0, f"a {watch.largest / MIB:.0f} MiB temp file was written"
    assert _listing(tmpdir) == before
    with client(node) as http:
        assert http.get("/healthz").status_code == 200


# -- wrong bearer tokens ----------------------------------------------------------------------


def attack(count: int, at_once: int, one: Callable[[int], int], within_s: float) -> list[int]:
    """`count` attempts, `at_once` in parallel; each must be answered within `within_s`."""
    with ThreadPoolExecutor(at_once) as pool:
        futures = [pool.submit(one, index) for index in range(count)]
        return [future.result(timeout=within_s) for future in futures]


def test_wrong_bearer_tokens_keep_memory_bounded(node: Cadnode) -> None:
    def scrape(index: int) -> int:
        with client(node, address(2, index)) as http:
            headers = {"Authorization": f"Bearer wrong-token-{index}"}
            return http.get("/metrics", headers=headers).status_code

    pid = node.process.pid
    baseline = resident_mb(pid)
    reset_peak(pid)  # the high-water mark from here on: the attack's, not start-up's
    statuses = attack(64, 32, scrape, within_s=120)
    growth = peak_mb(pid) - baseline
    print(f"memory growth {growth:.0f} MB; answers {sorted(set(statuses))}")
    assert set(statuses) <= {401, 429, 503}, statuses
    assert 401 in statuses  # the tokens were checked, not all turned away
    assert growth < 100, f"grew by {growth:.0f} MB"
    with client(node) as http:
        right = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200


def test_failures_from_one_address_are_limited_and_audited(node: Cadnode) -> None:
    source = address(4, 0)
    with client(node, source) as http:
        statuses = []
        for index in range(12):
            answer = http.get("/metrics", headers={"Authorization": f"Bearer nope-{index}"})
            statuses.append(answer.status_code)
        assert statuses == [401] * 10 + [429] * 2
        assert 1 <= int(answer.headers["retry-after"]) <= 60
        # The limit holds for the password too, and for the right one: no check at all.
        locked = log_in(http)
        assert locked.status_code == 429 and "retry-after" in locked.headers
    events = [e for e in admin_events(node) if e["address"] == source]
    refused = [e for e in events if e["kind"] == "admin.token" and e["outcome"] == "refused"]
    lockouts = [e for e in events if e["kind"] == "admin.lockout"]
    assert len(refused) == 10 and len(lockouts) == 1
    with client(node, address(4, 1)) as http:  # another address is not locked out
        assert log_in(http).status_code == 303


# -- a password brute force -------------------------------------------------------------------


def test_healthz_stays_fast_during_a_password_brute_force(node: Cadnode) -> None:
    """The password checks run off the server's event loop: a probe of /healthz during the
    attack takes less than one Argon2 check made here under the same load (a loop that ran
    the checks itself would keep each probe waiting behind one or more of them). Compared
    with that check, not with a fixed time: a loaded machine slows both."""

    def guess(index: int) -> int:
        with client(node, address(3, index)) as http:
            return log_in(http, f"guess number {index}").status_code

    timings: list[float] = []
    with ThreadPoolExecutor(49) as pool, client(node) as probe:
        futures = [pool.submit(guess, index) for index in range(48)]
        one_check = pool.submit(_argon2_check_seconds)
        deadline = time.monotonic() + 120
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            started = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            timings.append(time.perf_counter() - started)
        statuses = [future.result(timeout=120) for future in futures]
        check_s = one_check.result(timeout=120)
    assert set(statuses) <= {401, 429, 503}, statuses
    assert 401 in statuses
    slowest = max(timings, default=0)
    assert len(timings) >= 20, f"{len(timings)} probes during the attack, slowest {slowest:.2f} s"
    median = statistics.median(timings)
    print(
        f"/healthz median {median * 1000:.1f} ms, slowest {slowest * 1000:.1f} ms, "
        f"{len(timings)} probes; one Argon2 check meanwhile {check_s * 1000:.1f} ms"
    )
    assert median < check_s, (
        f"/healthz median {median * 1000:.0f} ms, one Argon2 check {check_s * 1000:.0f} ms"
    )
    refused = [e for e in admin_events(node) if e["kind"] == "admin.login"]
    assert sum(e["outcome"] == "refused" for e in refused) == statuses.count(401)


def _argon2_check_seconds() -> float:
    """How long one Argon2 check of the node's kind (cadnode.admin.auth.verify, its default
    parameters) takes here, now."""
    hashed = hash_password("a password of the node's kind")
    started = time.perf_counter()
    assert not verify(hashed, "a wrong guess")
    return time.perf_counter() - started


# -- ids out of range -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [str(10**22), str(2**63), "-1", "0", "abc"])
def test_ids_out_of_range_are_not_found(node: Cadnode, bad: str) -> None:
    with client(node, address(5, 0)) as http:
        assert log_in(http).status_code == 303
        assert http.get(f"/jobs/{bad}").status_code == 404
        assert http.get(f"/results/{bad}/overlay.png").status_code == 404
        token = csrf_of(http.get("/queues").text)
        for action in ("retry", "discard"):
            answer = http.post(f"/deliveries/{bad}/{action}", data={"csrf": token})
            assert answer.status_code == 404, action


# -- readiness when the database is gone ------------------------------------------------------


def _chattr(flag: str, path: Path) -> bool:
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    done = subprocess.run([chattr, flag, str(path)], capture_output=True, check=False)
    return done.returncode == 0


def test_readyz_fails_when_the_database_file_is_not_the_one_opened(tmp_path: Path) -> None:
    with admin_node(tmp_path) as node, client(node) as http:
        database = node.data_dir / "cadnode.db"

        def database_check() -> tuple[int, str]:
            answer = http.get("/readyz")
            return answer.status_code, answer.json()["checks"]["database"]["detail"]

        wait_for(lambda: database_check()[0] == 200, 30, "the node to be ready")
        if _chattr("+i", database):  # root on a filesystem with attributes
            try:
                status, detail = database_check()
                assert status == 503 and "not writable" in detail, detail
            finally:
                _chattr("-i", database)
            assert database_check()[0] == 200
        kept = tmp_path / "kept.db"
        os.link(database, kept)
        database.unlink()
        status, detail = database_check()
        assert status == 503 and "deleted" in detail, detail
        os.link(kept, database)  # the same file back: ready again
        assert database_check()[0] == 200
        shutil.copy(database, tmp_path / "copy.db")
        os.replace(tmp_path / "copy.db", database)
        status, detail = database_check()
        assert status == 503 and "replaced" in detail, detail
