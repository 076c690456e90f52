"""STOW-RS delivery: results to a destination given by `url` (cadnode/deliver/stow.py).

Orthanc with its DICOMweb plugin is the destination of a running `cadnode serve`; a small
misbehaving HTTP server plays the PACS no real peer imitates (a 200 that stored nothing, a
200 naming no instance, a 202 with a warning, a stall half-way through the body, a 401), each
against the dispatcher itself, so the outbox's retry, dead letters and admin retry are the
real ones.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlmodel import select

from cadnode.core.config import DispatchSettings, StowDestination, load_settings
from cadnode.core.db import Database, Delivery, DeliveryState, JobState, ResultObject
from cadnode.core.yamlfile import ConfigError
from cadnode.deliver import outbox_admin
from cadnode.deliver.dispatch import Dispatcher
from cadnode.deliver.stow import StowObject, judge
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import REPO, free_port, run_cadnode, run_orthanc, wait_for
from tests.rows import new_job
from tests.test_delivery_outage import deliveries, outbox, push_films, srs_in
from tests.test_dispatch import make_due_now, queue_one, the_delivery

UID = "1.2.826.0.1.3680043.8.498.1"
OTHER = "1.2.826.0.1.3680043.8.498.2"
ONE = [StowObject(7, UID, Path("unused"))]


def referenced(*uids: str, warning: int | None = None) -> dict[str, Any]:
    items = []
    for uid in uids:
        item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if warning is not None:
            item["00081196"] = {"vr": "US", "Value": [warning]}
        items.append(item)
    return {"00081199": {"vr": "SQ", "Value": items}}


def failed(*uids: str, reason: int = 0xA700) -> dict[str, Any]:
    items = [
        {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}
        for uid in uids
    ]
    return {"00081198": {"vr": "SQ", "Value": items}}


def answer(status: int, dataset: dict[str, Any], **headers: str) -> Any:
    [outcome] = judge(status, headers, json.dumps(dataset).encode(), ONE)
    return outcome


# --- the answer, judged per instance (no network) ---------------------------------------


def test_a_200_naming_the_instance_is_stored() -> None:
    outcome = answer(200, referenced(UID))
    assert outcome.stored and outcome.warning is None and outcome.status == "HTTP 200"


def test_a_200_with_a_failed_sop_entry_is_a_failure_to_retry() -> None:
    outcome = answer(200, {**referenced(UID), **failed(UID, reason=0xA700)})
    assert not outcome.stored and not outcome.final
    assert "0xA700 (out of resources)" in outcome.reason


def test_a_200_that_names_another_instance_or_none_is_a_failure() -> None:
    for dataset in (referenced(OTHER), {}):
        outcome = answer(200, dataset)
        assert not outcome.stored and not outcome.final
        assert "does not list it as stored" in outcome.reason
    [empty] = judge(200, {}, b"", ONE)
    assert not empty.stored and "without a DICOM JSON answer" in empty.reason


def test_a_202_is_stored_with_its_warning() -> None:
    outcome = answer(202, referenced(UID, warning=0xB000), Warning="299 pacs coerced")
    assert outcome.stored
    assert outcome.warning is not None and "0xB000 (coercion of data elements)" in outcome.warning
    assert "299 pacs coerced" in outcome.warning
    assert "none named" in (answer(202, referenced(UID)).warning or "")


def test_a_409_stores_nothing_and_gives_each_its_reason() -> None:
    outcome = answer(409, failed(UID, reason=0x0122))
    assert not outcome.stored and not outcome.final and "SOP class not supported" in outcome.reason


@pytest.mark.parametrize(
    ("status", "final"),
    [
        *((status, True) for status in (400, 401, 403, 404, 413, 301)),
        *((status, False) for status in (408, 429, 500, 503)),
    ],
)
def test_a_4xx_is_permanent_and_a_5xx_transient(status: int, final: bool) -> None:
    [outcome] = judge(status, {}, b"no", ONE)
    assert not outcome.stored and outcome.final is final
    assert f"HTTP {status}" in outcome.reason


def test_url_and_ae_title_together_are_refused_with_the_line(tmp_path: Path) -> None:
    config = tmp_path / "cadnode.yaml"
    config.write_text(
        "destinations:\n  web:\n    url: http://127.0.0.1:1/dicom-web\n    ae_title: PACS\n"
        "  slow:\n    url: https://127.0.0.1:1/dicom-web\n    timeout_s: 0\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_settings({"CADNODE_CONFIG": str(config)})
    problems = refused.value.problems
    assert any(p.startswith(f"{config}:2:3:") and "not both" in p for p in problems), problems
    assert any(p.startswith(f"{config}:7:5:") and "timeout_s" in p for p in problems), problems


# --- a misbehaving DICOMweb server, against the dispatcher ------------------------------


@dataclass
class Pacs:
    """The misbehaving server's state: how it answers next, and what it kept."""

    mode: str = "ok"
    stored: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    authorizations: list[str] = field(default_factory=list)


def uids_in(body: bytes, content_type: str) -> list[str]:
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    parts = body.split(b"--" + boundary)[1:-1]
    return [
        str(dcmread(BytesIO(part.split(b"\r\n\r\n", 1)[1][:-2])).SOPInstanceUID) for part in parts
    ]


def handler(pacs: Pacs) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            pacs.requests += 1
            pacs.authorizations.append(self.headers.get("Authorization", ""))
            length = int(self.headers["Content-Length"])
            if pacs.mode == "stall":
                self.rfile.read(length // 2)
                pacs.stalled.set()
                pacs.release.wait(30)
                return  # the connection closes with no answer
            uids = uids_in(self.rfile.read(length), self.headers["Content-Type"])
            status, dataset = self._answer(uids)
            body = json.dumps(dataset).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            if status == 202:
                self.send_header("Warning", "299 test-pacs: coerced")
            self.end_headers()
            self.wfile.write(body)

        def _answer(self, uids: list[str]) -> tuple[int, dict[str, Any]]:
            if pacs.mode in ("ok", "warn"):
                pacs.stored.update(uids)
            return {
                "ok": (200, referenced(*uids)),
                "warn": (202, referenced(*uids, warning=0xB000)),
                "failed": (200, failed(*uids)),
                "unnamed": (200, {}),
                "unauthorized": (401, {}),
            }[pacs.mode]

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def pacs() -> Iterator[tuple[Pacs, str]]:
    state = Pacs()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


def dispatcher(database: Database, results: Path, url: str, **options: Any) -> Dispatcher:
    settings = DispatchSettings(
        max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.01, timeout_s=2
    )
    destination = StowDestination(url=url, **options)
    return Dispatcher(database, results, settings, "CADNODE", destinations={"pacs": destination})


def uid_of(database: Database) -> str:
    return the_delivery(database).object_uid


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["failed", "unnamed"])
def test_a_200_that_stored_nothing_is_retried_then_dead_lettered(
    database: Database, tmp_path: Path, pacs: tuple[Pacs, str], mode: str
) -> None:
    state, url = pacs
    state.mode = mode
    queue_one(database, tmp_path)
    sender = dispatcher(database, tmp_path, url)
    sender.advance()
    delivery = the_delivery(database)
    assert delivery.state is DeliveryState.pending and delivery.attempts == 1
    for _ in range(2):
        make_due_now(database)
        sender.advance()
    delivery = the_delivery(database)
    assert delivery.state is DeliveryState.failed and delivery.attempts == 3
    assert "HTTP 200" in (delivery.last_error or "") and state.requests == 3


@pytest.mark.integration
def test_a_202_is_sent_once_with_its_warning_kept(
    database: Database, tmp_path: Path, pacs: tuple[Pacs, str]
) -> None:
    state, url = pacs
    state.mode = "warn"
    queue_one(database, tmp_path)
    dispatcher(database, tmp_path, url).advance()
    delivery = the_delivery(database)
    assert delivery.state is DeliveryState.sent and delivery.attempts == 1
    assert "0xB000" in (delivery.last_error or "") and "coerced" in (delivery.last_error or "")
    assert state.stored == {delivery.object_uid: 1}


@pytest.mark.integration
def test_a_stall_half_way_through_the_body_times_out_and_is_sent_once_later(
    database: Database, tmp_path: Path, pacs: tuple[Pacs, str]
) -> None:
    state, url = pacs
    state.mode = "stall"
    queue_one(database, tmp_path)
    sender = dispatcher(database, tmp_path, url, timeout_s=1, timeout_s_per_mb=0)
    sender.advance()
    assert state.stalled.is_set()
    delivery = the_delivery(database)
    assert delivery.state is DeliveryState.pending and delivery.attempts == 1
    assert "no answer within 1 s" in (delivery.last_error or "")
    state.mode = "ok"  # the server recovers
    state.release.set()
    make_due_now(database)
    # The same delivery, with the default time limit: one second was for the stall alone,
    # and a loaded machine may take that long to parse and answer a sound request.
    dispatcher(database, tmp_path, url).advance()
    delivery = the_delivery(database)
    assert delivery.state is DeliveryState.sent, delivery.last_error
    assert delivery.attempts == 2
    assert state.stored == {delivery.object_uid: 1}


@pytest.mark.integration
def test_a_401_is_dead_lettered_at_once_and_an_admin_retry_sends_it(
    database: Database, tmp_path: Path, pacs: tuple[Pacs, str]
) -> None:
    state, url = pacs
    state.mode = "unauthorized"
    token = tmp_path / "token"
    token.write_text("expired\n")
    queue_one(database, tmp_path)
    sender = dispatcher(database, tmp_path, url, auth={"bearer_token_file": token})
    sender.advance()
    delivery = the_delivery(database)
    assert delivery.state is DeliveryState.failed and delivery.attempts == 1
    assert "HTTP 401" in (delivery.last_error or "") and "auth" in (delivery.last_error or "")
    assert state.authorizations == ["Bearer expired"]

    token.write_text("renewed\n")  # the admin fixes the token, then replays the dead letter
    state.mode = "ok"
    assert delivery.id is not None
    [outcome] = outbox_admin.retry(database, [delivery.id], "test")
    assert outcome.done
    sender.advance()
    delivery = the_delivery(database)
    assert delivery.state is DeliveryState.sent and delivery.last_error is None
    assert state.authorizations[-1] == "Bearer renewed"
    assert state.stored == {delivery.object_uid: 1}


def queue_films(database: Database, results: Path, count: int) -> None:
    """`count` results of one encoded job, each queued for "pacs"."""
    with database.session() as session:
        job = new_job(session, "1.2.3", state=JobState.encoded)
        assert job.id is not None
        for seed in range(count):
            ds = write_chest_radiograph(results / f"{seed}.dcm", seed=seed, size=64)
            uid = str(ds.SOPInstanceUID)
            made = ResultObject(
                sop_instance_uid=uid, job_id=job.id, engine="e", modality="DX", path=f"{seed}.dcm"
            )
            session.add(made)
            session.flush()
            session.add(Delivery(object_uid=uid, job_id=job.id, destination="pacs"))
        session.commit()


@pytest.mark.integration
def test_several_requests_in_flight_send_each_object_once(
    database: Database, tmp_path: Path, pacs: tuple[Pacs, str]
) -> None:
    state, url = pacs
    queue_films(database, tmp_path, 5)
    sender = dispatcher(database, tmp_path, url, max_in_flight=2, instances_per_request=2)
    sender.advance()
    with database.session() as session:
        rows = session.exec(select(Delivery)).all()
        assert {r.state for r in rows} == {DeliveryState.sent}
        assert state.stored == Counter({r.object_uid: 1 for r in rows})
    assert state.requests == 3  # 2 + 2 + 1


# --- Orthanc's DICOMweb plugin, the destination of a running node -----------------------


def stow_config(folder: Path, url: str) -> Path:
    """The shipped rules and engines, results to `url` by STOW-RS, with a short back-off."""
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "dispatch": {"max_attempts": 1000, "backoff_initial_s": 0.2, "backoff_max_s": 1.0},
        "destinations": {"archive": {"url": url, "timeout_s": 5}},
        "results": {"destinations": ["archive"]},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cadnode-stow.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def test_a_film_pushed_by_storescu_has_its_sr_stored_in_orthanc_by_stow(tmp_path: Path) -> None:
    with run_orthanc(tmp_path / "orthanc", dicomweb=True) as pacs:
        config = stow_config(tmp_path, pacs.dicomweb_url)
        with run_cadnode(tmp_path / "node", None, CADNODE_CONFIG=str(config)) as node:
            [film] = push_films(node, tmp_path, range(807, 808))  # ruled out: one SR
            wait_for(lambda: srs_in(pacs, film), 90, "the SR in Orthanc", interval_s=0.3)
            rows = deliveries(node)  # as an admin lists them, with the address
            log = node.log_text()
        [sr] = srs_in(pacs, film)
        assert len(pacs.instances()) == 1
    assert [r["state"] for r in rows] == ["sent"] and rows[0]["object_uid"] == sr["SOPInstanceUID"]
    assert rows[0]["address"] == pacs.dicomweb_url and rows[0]["last_error"] is None
    assert '"event": "stow.answered"' in log and '"status": 200' in log


def test_orthanc_stopped_and_restarted_mid_run_gets_every_result_once(tmp_path: Path) -> None:
    http_port = free_port()  # the destination's address, the same for both Orthancs
    config = stow_config(tmp_path, f"http://127.0.0.1:{http_port}/dicom-web")
    with run_cadnode(tmp_path / "node", None, CADNODE_CONFIG=str(config)) as node:
        with run_orthanc(tmp_path / "orthanc", dicomweb=True, http_port=http_port) as pacs:
            first = push_films(node, tmp_path, range(815, 816))  # ruled out, as the rest
            wait_for(lambda: srs_in(pacs, first[0]), 90, "the first SR", interval_s=0.2)
        # Orthanc is down: these wait with back-off, each tried at least once.
        later = push_films(node, tmp_path, range(816, 819))
        wait_for(
            lambda: (
                len(rows := outbox(node)) == 4
                and all(r["state"] == "sent" or r["attempts"] >= 1 for r in rows)
            ),
            90,
            "every result queued and tried",
            interval_s=0.3,
        )
        assert {r["state"] for r in outbox(node)} == {"sent", "pending"}
        with run_orthanc(tmp_path / "orthanc", dicomweb=True, http_port=http_port) as pacs:
            wait_for(lambda: {r["state"] for r in outbox(node)} == {"sent"}, 60, "all sent", 0.2)
            in_pacs = [srs_in(pacs, film) for film in first + later]
            total = len(pacs.instances())
        rows, log = outbox(node), node.log_text()
    print(
        f"STOW outage: SRs per study {[len(s) for s in in_pacs]}, attempts "
        f"{[r['attempts'] for r in rows]}"
    )
    assert [len(srs) for srs in in_pacs] == [1] * 4 and total == 4
    assert log.count('"event": "delivery.sent"') == 4
    assert any("connection failed" in (r["last_error"] or "") for r in rows) or all(
        r["attempts"] > 1 for r in rows[1:]
    )
