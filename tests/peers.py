"""Real peers for the tests: Orthanc as the PACS, DCMTK's tools, and cadnode itself,
each started as its own process on free loopback ports."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread

from tests.dicom_validation import require_tool

REPO = Path(__file__).resolve().parent.parent


# Ports handed out below the kernel's ephemeral range (32768 and up here): a port the kernel
# picks for bind(0) is one it may also pick as the source port of an outgoing connection, and
# a node retrying a PACS that is not up yet may even connect that port to itself, so the PACS
# started later finds it taken. Below the range, only a listener can hold a port.
_BELOW_EPHEMERAL = range(20000, 32768)


def _listen_ports() -> range:
    """This process's share of the ports: under pytest-xdist each worker draws from its own
    slice, so two workers never hand out the same port (each remembers only its own)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... or unset
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker.startswith("gw") else 0
    return _BELOW_EPHEMERAL[index::workers]


_LISTEN_PORTS = _listen_ports()
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing holds now, below the ephemeral range, never handed out twice
    in this process."""
    for port in random.sample(_LISTEN_PORTS, len(_LISTEN_PORTS)):
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_LISTEN_PORTS}")


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Poll `condition` until it returns something true, and return that; fail after
    `timeout_s`. It is asked once more at the deadline, so a slow check on a loaded machine
    (a CLI round trip, a REST call) is never cut short by its own duration."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    ae_title: str = "ORTHANC"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def instances_of_study(self, study_uid: str) -> list[str]:
        """Orthanc ids of the study's instances (its REST /tools/lookup and /studies)."""
        found = self.post("/tools/lookup", study_uid.encode())
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        return [i["ID"] for s in studies for i in self.get(f"/studies/{s}/instances")]

    def post(self, path: str, body: bytes) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body)
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def download(self, orthanc_id: str, path: Path) -> Path:
        path.write_bytes(self.get(f"/instances/{orthanc_id}/file"))
        return path

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.dicom_port}"

    @property
    def dicomweb_url(self) -> str:
        """Its DICOMweb service root (run_orthanc's `dicomweb`)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"


DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@contextmanager
def run_orthanc(
    folder: Path,
    dicom_port: int | None = None,
    extra: dict[str, Any] | None = None,
    *,
    dicomweb: bool = False,
    http_port: int | None = None,
) -> Iterator[Orthanc]:
    """Orthanc as the PACS; `extra` adds to (or overrides) its configuration, e.g. the
    DicomModalities it sends Storage Commitment reports to. `dicomweb`: with its DICOMweb
    plugin, served at `Orthanc.dicomweb_url` (STOW-RS, QIDO-RS, WADO-RS). `http_port`: a
    restarted Orthanc comes back where its clients were told it is."""
    binary = require_tool("Orthanc")
    orthanc = Orthanc(http_port=http_port or free_port(), dicom_port=dicom_port or free_port())
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "cadnode-test-pacs",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": orthanc.http_port,
        "DicomPort": orthanc.dicom_port,
        "DicomAet": orthanc.ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
        **({"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}} if dicomweb else {}),
        **(extra or {}),
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with (folder / "orthanc.log").open("w") as log:
        process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=log)
    try:
        wait_for(
            lambda: _answers(orthanc) or _exited(process, folder / "orthanc.log"),
            30,
            "Orthanc's REST API",
        )
        yield orthanc
    finally:
        _terminate(process)


def _exited(process: subprocess.Popen[bytes], log: Path) -> bool:
    """False while `process` runs; once it has exited, fail with its log's last lines."""
    if process.poll() is None:
        return False
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise AssertionError(f"{log.parent.name}: exited with {process.returncode}:\n{tail}")


def _answers(orthanc: Orthanc) -> bool:
    try:
        orthanc.get("/system")
        return True
    except OSError:
        return False


@dataclass
class Cadnode:
    process: subprocess.Popen[bytes]
    dicom_port: int
    http_port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cadnode.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def studies(self) -> list[dict[str, Any]]:
        done = self.cli("studies", "--json")
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))

    def log_text(self) -> str:
        return self.log_path.read_text()


@contextmanager
def run_cadnode(folder: Path, destination: str | None, **overrides: str) -> Iterator[Cadnode]:
    """`cadnode serve` as a subprocess on the shipped config, rules and engines."""
    # A test may choose the DICOM port (a peer must know it before cadnode starts).
    dicom_port = int(overrides.get("CADNODE_DICOM_PORT") or free_port())
    http_port = free_port()
    env = {
        **os.environ,
        # Receiving in the node's own process, unless a test asks for receiver processes
        # (tests/test_ingest_processes.py, the `auto` default among them): each costs seconds
        # of start-up on a 2-CPU machine, and most tests start several nodes.
        "CADNODE_DICOM_RECEIVERS": "1",
        "CADNODE_DATA_DIR": str(folder / "var"),
        "CADNODE_DICOM_PORT": str(dicom_port),
        "CADNODE_HTTP_PORT": str(http_port),
        **overrides,
    }
    if destination:
        env["CADNODE_DESTINATION"] = destination
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "cadnode.log"
    with log_path.open("a") as log:  # a restart keeps the earlier run's events
        process = subprocess.Popen(
            [sys.executable, "-m", "cadnode.cli", "serve"],
            env=env,
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
    node = Cadnode(process, dicom_port, http_port, folder / "var", log_path, env)
    try:
        wait_for(
            lambda: port_open(dicom_port) or process.poll() is not None, 60, "cadnode to listen"
        )
        assert process.poll() is None, f"cadnode exited early:\n{node.log_text()}"
        yield node
    finally:
        _terminate(process)


def findscu(port: int, folder: Path, **identifier: str) -> list[Dataset]:
    """DCMTK's findscu, study root, against the node's port with `identifier` as its keys
    (an empty value: a return key); the matches, as it wrote them under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for earlier in folder.glob("rsp*.dcm"):  # a previous try's answers
        earlier.unlink()
    keys = [arg for key, value in identifier.items() for arg in ("-k", f"{key}={value}")]
    command = [require_tool("findscu"), "-S", "-X", "-od", str(folder), "-aec", "CADNODE"]
    done = subprocess.run(
        [*command, *keys, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [dcmread(path) for path in sorted(folder.glob("rsp*.dcm"))]


def storescu(
    port: int,
    *files: Path,
    called_ae: str = "CADNODE",
    calling_ae: str = "MODALITY",
    options: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu; TCP_NODELAY=1 as without it DCMTK waits on Nagle's algorithm."""
    tool = require_tool("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [tool, *options, *_association(port, called_ae, calling_ae), *map(str, files)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def echoscu(
    port: int, called_ae: str = "CADNODE", calling_ae: str = "ECHOSCU", repeat: int = 1
) -> subprocess.CompletedProcess[str]:
    """DCMTK's echoscu, verbose, so a rejection's reason is in its output; `repeat` C-ECHOs
    over one association."""
    tool = require_tool("echoscu")
    return subprocess.run(
        [tool, "-v", "--repeat", str(repeat), *_association(port, called_ae, calling_ae)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _association(port: int, called_ae: str, calling_ae: str) -> list[str]:
    """A DCMTK tool's arguments for an association from `calling_ae` to the node on loopback."""
    return ["-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)]


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
