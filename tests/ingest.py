"""Helpers for the ingest tests: an in-process receiver, DCMTK's storescp as a bit-preserving
oracle, and what storescu needs to send a file in its own transfer syntax."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom import uid as uids

from cadnode.core.config import (
    AssembleSettings,
    DicomSettings,
    LimitsSettings,
    Settings,
    StorageSettings,
)
from cadnode.core.db import Database
from cadnode.ingest.receive import Receiver
from tests.dicom_validation import require_tool
from tests.peers import echoscu, free_port, port_open, wait_for

# storescu proposes uncompressed transfer syntaxes unless told otherwise; with one of these
# it also proposes the file's own, and sends the file as it is instead of failing to convert.
STORESCU_PROPOSE = {
    uids.ImplicitVRLittleEndian: "-xi",
    uids.ExplicitVRLittleEndian: "-xe",
    uids.ExplicitVRBigEndian: "-xb",
    uids.DeflatedExplicitVRLittleEndian: "-xd",
    uids.JPEGBaseline8Bit: "-xy",
    uids.JPEGExtended12Bit: "-xx",
    uids.JPEGLosslessSV1: "-xs",
    uids.JPEGLSLossless: "-xt",
    uids.JPEGLSNearLossless: "-xu",
    uids.JPEG2000Lossless: "-xv",
    uids.JPEG2000: "-xw",
    uids.RLELossless: "-xr",
}


def sending_as_is(path: Path) -> tuple[str, ...]:
    """storescu options that send `path` in its own transfer syntax, on its own SOP class."""
    syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return ("-R", STORESCU_PROPOSE[syntax])


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information: what the sender's dataset was."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    (meta_length,) = struct.unpack("<I", data[140:144])  # (0002,0000) UL value
    return data[144 + meta_length :]


@dataclass
class Receiving:
    receiver: Receiver
    port: int
    nudges: list[int] = field(default_factory=list)

    @property
    def spool(self) -> Path:
        return self.receiver.spool.folder


def node_settings(folder: Path, **sections: Any) -> Settings:
    """Settings for an in-process node under `folder`, any port; sections as keyword dicts."""
    return Settings(
        storage=StorageSettings(data_dir=folder / "var", **sections.get("storage", {})),
        dicom=DicomSettings(port=0, **sections.get("dicom", {})),
        assemble=AssembleSettings(**sections.get("assemble", {})),
        limits=LimitsSettings(**sections.get("limits", {})),
    )


@contextmanager
def receiving(folder: Path, database: Database, **sections: Any) -> Iterator[Receiving]:
    """A started receiver on a free port, stopped (not drained) afterwards."""
    nudges: list[int] = []
    receiver = Receiver(node_settings(folder, **sections), database, lambda: nudges.append(1))
    port = receiver.start()
    try:
        yield Receiving(receiver, port, nudges)
    finally:
        receiver.stop(drain_timeout_s=0)


@contextmanager
def storescp(folder: Path, *options: str) -> Iterator[int]:
    """DCMTK's storescp, bit-preserving, every transfer syntax: the reference receiver;
    `options` add to its command line (`--ignore`: receive, answer, store nothing)."""
    tool = require_tool("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [tool, "+B", "+xa", *options, "-aet", "STORESCP", "-od", str(folder), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), 20, "storescp to listen")
        yield port
    finally:
        process.terminate()
        process.wait(20)


@contextmanager
def captured_events() -> Iterator[list[dict[str, Any]]]:
    """The structlog events emitted meanwhile, as dicts (loggers already cached included)."""
    events: list[dict[str, Any]] = []

    def capture(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        events.append(dict(event))
        return event

    processors = structlog.get_config()["processors"]  # the list cached loggers share
    processors.insert(0, capture)
    try:
        yield events
    finally:
        processors.remove(capture)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event["event"] == name]


def echo(port: int, calling_ae: str = "ECHOSCU", called_ae: str = "CADNODE") -> str:
    """echoscu's exit status and verbose output, as one text."""
    done = echoscu(port, called_ae=called_ae, calling_ae=calling_ae)
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}"


def json_events(text: str) -> list[dict[str, Any]]:
    """Every JSON event in a node's log. Two threads logging at once (structlog and a
    library's stdlib records) may share a line, so objects are decoded one after another."""
    decoder = json.JSONDecoder()
    events = []
    for line in text.splitlines():
        position = line.find("{")
        while position != -1:
            event, end = decoder.raw_decode(line, position)
            events.append(event)
            position = line.find("{", end)
    return events
