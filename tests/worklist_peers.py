"""Peers for the worklist-priority tests and benchmark, each a real protocol implementation:

- `WorklistClient`: a pynetdicom UPS SCU (C-FIND, N-GET, N-ACTION) that also listens as the
  subscriber's UPS Event SCP and records every N-EVENT-REPORT it is sent;
- `MllpListener`: hl7apy's own MLLP server, parsing each message and answering an ACK;
- `WebhookReceiver`: an HTTP server recording every JSON POST.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepWatch,
)

from tests.peers import REPO, free_port, wait_for

GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"


@dataclass(frozen=True)
class EventReport:
    at: float  # time.perf_counter() when it arrived
    workitem: str
    event_type: int
    info: Dataset


class WorklistClient:
    """A reading-worklist client: queries cadnode's UPS SCP and receives its event reports."""

    def __init__(self, ae_title: str = "WATCHER") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.events: list[EventReport] = []
        self._lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        self._ae.add_supported_context(UnifiedProcedureStepEvent)
        for sop_class in (UnifiedProcedureStepPull, UnifiedProcedureStepWatch):
            self._ae.add_requested_context(sop_class)
        self._server: Any = None

    def __enter__(self) -> WorklistClient:
        handlers = [(evt.EVT_N_EVENT_REPORT, self._on_event)]
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers
        )
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()

    def _on_event(self, event: Any) -> tuple[int, None]:
        report = EventReport(
            at=time.perf_counter(),
            workitem=str(event.request.AffectedSOPInstanceUID),
            event_type=int(event.request.EventTypeID),
            info=event.event_information,
        )
        with self._lock:
            self.events.append(report)
        return 0x0000, None

    def events_for(self, workitem: str) -> list[EventReport]:
        with self._lock:
            return [e for e in self.events if e.workitem == workitem]

    def wait_for_event(
        self, condition: Callable[[EventReport], bool], timeout_s: float = 30
    ) -> EventReport:
        def found() -> EventReport | None:
            with self._lock:
                return next((e for e in self.events if condition(e)), None)

        return wait_for(found, timeout_s, "an N-EVENT-REPORT", interval_s=0.005)  # type: ignore[no-any-return]

    def _associate(self, port: int) -> Any:
        assoc = self._ae.associate("127.0.0.1", port, ae_title="CADNODE")
        assert assoc.is_established, "cadnode refused the worklist client's association"
        return assoc

    def action(self, port: int, workitem: str, action_type: int, info: Dataset) -> int:
        assoc = self._associate(port)
        try:
            status, _ = assoc.send_n_action(
                info,
                action_type,
                UnifiedProcedureStepPush,
                workitem,
                meta_uid=UnifiedProcedureStepWatch
                if action_type >= 3
                else UnifiedProcedureStepPull,
            )
            return int(status.Status)
        finally:
            assoc.release()

    def subscribe(self, port: int, workitem: str = GLOBAL_SUBSCRIPTION, lock: bool = False) -> int:
        info = Dataset()
        info.ReceivingAE = self.ae_title
        info.DeletionLock = "TRUE" if lock else "FALSE"
        return self.action(port, workitem, 3, info)

    def find(self, port: int, query: Dataset) -> list[Dataset]:
        assoc = self._associate(port)
        try:
            answers = assoc.send_c_find(query, UnifiedProcedureStepPull)
            found = [identifier for status, identifier in answers if status.Status == 0xFF00]
        finally:
            assoc.release()
        return found

    def get(self, port: int, workitem: str, tags: list[int]) -> tuple[int, Dataset | None]:
        assoc = self._associate(port)
        try:
            status, attributes = assoc.send_n_get(
                tags, UnifiedProcedureStepPush, workitem, meta_uid=UnifiedProcedureStepPull
            )
            return int(status.Status), attributes
        finally:
            assoc.release()


def study_query(study_uid: str) -> Dataset:
    """A worklist query: the workitem of this study, with its priority and identifiers."""
    request = Dataset()
    request.StudyInstanceUID = study_uid
    request.AccessionNumber = ""
    query = Dataset()
    query.SOPInstanceUID = ""
    query.ScheduledProcedureStepPriority = ""
    query.ProcedureStepState = ""
    query.CommentsOnTheScheduledProcedureStep = ""
    query.ReferencedRequestSequence = [request]
    query.InputInformationSequence = []
    return query


class UpsPushScp:
    """Another worklist manager: a pynetdicom UPS Push/Pull SCP keeping what it is sent."""

    def __init__(self, ae_title: str = "WORKLIST") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.requests: list[tuple[str, str, Dataset]] = []  # (N-CREATE|N-SET, UID, dataset)
        self._ae = AE(ae_title=ae_title)
        for sop_class in (UnifiedProcedureStepPush, UnifiedProcedureStepPull):
            self._ae.add_supported_context(sop_class)
        self._server: Any = None

    def __enter__(self) -> UpsPushScp:
        handlers = [(evt.EVT_N_CREATE, self._on_create), (evt.EVT_N_SET, self._on_set)]
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers
        )
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()

    def _on_create(self, event: Any) -> tuple[int, Dataset]:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.requests.append(("N-CREATE", uid, event.attribute_list))
        return 0x0000, event.attribute_list

    def _on_set(self, event: Any) -> tuple[int, Dataset]:
        uid = str(event.request.RequestedSOPInstanceUID)
        self.requests.append(("N-SET", uid, event.modification_list))
        return 0x0000, event.modification_list


@dataclass(frozen=True)
class Hl7Received:
    at: float
    message: Message


class MllpListener:
    """A RIS: hl7apy's MLLP server; parses each order update and acknowledges it (AA)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[Hl7Received] = []
        self._server: MLLPServer | None = None

    def start(self) -> MllpListener:
        listener = self

        class Acknowledge(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                received = parse_message(self.incoming_message)
                listener.messages.append(Hl7Received(time.perf_counter(), received))
                return str(acknowledgement(received).to_mllp())

        handlers = {kind: (Acknowledge,) for kind in ("OMI^O23^OMI_O23", "ORM^O01")}
        self._server = MLLPServer("127.0.0.1", self.port, handlers)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def acknowledgement(received: Message) -> Message:
    ack = Message("ACK", version=received.version, validation_level=VALIDATION_LEVEL.TOLERANT)
    ack.msh.msh_3 = "RIS"
    ack.msh.msh_9 = "ACK"
    ack.msh.msh_10 = f"ACK{received.msh.msh_10.to_er7()}"
    ack.msh.msh_11 = "P"
    ack.msa.msa_1 = "AA"
    ack.msa.msa_2 = received.msh.msh_10.to_er7()
    return ack


class WebhookReceiver:
    """An HTTP endpoint recording each POSTed JSON document with its arrival time."""

    def __init__(self) -> None:
        self.port = free_port()
        self.posts: list[tuple[float, dict[str, Any], dict[str, str]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((time.perf_counter(), json.loads(body), dict(self.headers)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)

    def __enter__(self) -> WebhookReceiver:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cadnode/priority"


def priority_config(
    folder: Path,
    *,
    watcher: WorklistClient,
    hl7_port: int,
    webhook_url: str | None = None,
    hl7_message: str = "OMI^O23",
    push_to: UpsPushScp | None = None,
) -> Path:
    """A cadnode.yaml on the shipped rules and engines, publishing to these peers, with a
    short retry back-off so a peer coming back is noticed within a second."""
    config: dict[str, Any] = {
        "dicom": {"ae_title": "CADNODE"},
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "dispatch": {
            "max_attempts": 100,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 0.5,
            "timeout_s": 5,
        },
        "destinations": {
            "watcher": {"ae_title": watcher.ae_title, "host": "127.0.0.1", "port": watcher.port}
        },
        "priority": {
            "hl7": {"ris": {"host": "127.0.0.1", "port": hl7_port, "message": hl7_message}},
            "webhooks": {"hook": {"url": webhook_url}} if webhook_url else {},
        },
    }
    if push_to is not None:
        address = {"ae_title": push_to.ae_title, "host": "127.0.0.1", "port": push_to.port}
        config["destinations"]["worklist"] = address
        config["priority"]["ups"] = {"push": ["worklist"]}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cadnode.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path
