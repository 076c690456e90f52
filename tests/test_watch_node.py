"""Watchdogs on a real `cadnode serve`, with thresholds of seconds: a destination with nothing
listening raises its alert, and a job stuck in `encoded` (its delivery scheduled a day out)
raises one too; a webhook receiver on loopback is told of each, the dashboard shows them as a
banner, /metrics counts them and `cadnode alerts` lists them. Then an admin discards the stuck
delivery and Orthanc comes up on the destination's port: both alerts clear, and the receiver
is told that too, each alert raised and cleared once, never naming the patient."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from cadnode.admin.auth import hash_password
from cadnode.core.db import Database, Delivery, JobState, utcnow
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.alerting import Hooked, webhook_receiver
from tests.peers import REPO, Cadnode, free_port, port_open, run_cadnode, run_orthanc, storescu
from tests.peers import wait_for as wait
from tests.rows import new_job

PASSWORD = "watchdog password"
PATIENT_NAME = "Quiet^Stall"
PATIENT_ID = "WATCH-0042"


def node_config(folder: Path, pacs_port: int, hook_url: str) -> Path:
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "storage": {"min_free_mb": 1},
        "dispatch": {
            "max_attempts": 1000,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1.0,
            "timeout_s": 5,
        },
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}},
        "results": {"destinations": ["pacs"]},
        "http": {"admin_password_hash": hash_password(PASSWORD)},
        "alerts": {
            "check_every": "0.5s",
            "job_stalled": "10s",
            "destination_failing": "3s",
            "webhook_url": hook_url,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cadnode.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def told(hooked: type[Hooked], event: str, kind: str, subject: str) -> bool:
    return any(
        (b["event"], b["kind"], b["subject"]) == (event, kind, subject) for _, b in hooked.received
    )


def stuck_job(node: Cadnode) -> int:
    """A job encoded an hour ago whose one delivery is scheduled a day out: dispatch leaves
    it be, as an outbox that stopped would. Its delivery's id."""
    with Database(node.data_dir / "cadnode.db").session() as session:
        job = new_job(
            session,
            "1.2.826.0.1.3680043.10.1.999",
            state=JobState.encoded,
            updated_at=utcnow() - dt.timedelta(hours=1),
        )
        assert job.id is not None
        delivery = Delivery(
            object_uid="1.2.826.0.1.3680043.10.1.999.1",
            job_id=job.id,
            destination="pacs",
            next_attempt_at=utcnow() + dt.timedelta(days=1),
        )
        session.add(delivery)
        session.commit()
        assert delivery.id is not None
        return delivery.id


@contextmanager
def logged_in(node: Cadnode) -> Iterator[httpx.Client]:
    """The dashboard as an admin's browser sees it, logged in with the password."""
    with httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", timeout=30) as client:
        page = client.get("/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf
        answer = client.post("/login", data={"password": PASSWORD, "csrf": csrf[1], "next": "/"})
        assert answer.status_code == 303, answer.text
        yield client


def alerts_listed(node: Cadnode) -> list[dict[str, Any]]:
    done = node.cli("alerts", "--json")
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def test_stalls_raise_alerts_that_notify_show_and_clear(tmp_path: Path) -> None:
    pacs_port = free_port()  # nothing listens here until Orthanc comes up
    with webhook_receiver() as (hook_url, hooked):
        config = node_config(tmp_path, pacs_port, hook_url)
        with run_cadnode(tmp_path / "node", None, CADNODE_CONFIG=str(config)) as node:
            write_chest_radiograph(
                tmp_path / "film.dcm", seed=7, patient_name=PATIENT_NAME, patient_id=PATIENT_ID
            )
            assert storescu(node.dicom_port, tmp_path / "film.dcm").returncode == 0
            wait(
                lambda: told(hooked, "alert.raised", "destination.failing", "pacs"),
                90,
                "the destination's alert at the webhook",
                interval_s=0.2,
            )
            stuck = stuck_job(node)
            wait(
                lambda: told(hooked, "alert.raised", "job.stalled", "encoded"),
                30,
                "the stuck job's alert at the webhook",
                interval_s=0.2,
            )

            wait(lambda: port_open(node.http_port), 30, "the admin port")
            with logged_in(node) as client:
                page = client.get("/studies").text
                banner = page[page.index('id="alerts"') :]
                assert "destination.failing" in banner and "<strong>pacs</strong>" in banner
                assert "job.stalled" in banner and "<strong>encoded</strong>" in banner
                metrics = client.get("/metrics").text
                assert 'cadnode_alerts_active{kind="destination.failing"} 1.0' in metrics
                assert 'cadnode_alerts_active{kind="job.stalled"} 1.0' in metrics
            listed = {(a["kind"], a["subject"]) for a in alerts_listed(node)}
            assert listed == {("destination.failing", "pacs"), ("job.stalled", "encoded")}

            # The admin gives up on the stuck delivery; the job settles, its alert clears.
            done = node.cli("deliveries", "discard", str(stuck))
            assert done.returncode == 0, done.stderr
            wait(
                lambda: told(hooked, "alert.cleared", "job.stalled", "encoded"),
                60,
                "the job's alert to clear",
                interval_s=0.2,
            )
            # The PACS comes up: the results go, and the destination's alert clears.
            with run_orthanc(tmp_path / "orthanc", dicom_port=pacs_port):
                wait(
                    lambda: told(hooked, "alert.cleared", "destination.failing", "pacs"),
                    60,
                    "the destination's alert to clear",
                    interval_s=0.2,
                )
            assert alerts_listed(node) == []
            with logged_in(node) as client:
                assert 'id="alerts"' not in client.get("/studies").text
            log = node.log_text()

    events = [(b["event"], b["kind"], b["subject"]) for _, b in hooked.received]
    for event in ("alert.raised", "alert.cleared"):
        for key in (("destination.failing", "pacs"), ("job.stalled", "encoded")):
            assert events.count((event, *key)) == 1  # once per condition, not per pass
    sent = json.dumps([body for _, body in hooked.received])
    for identifier in (PATIENT_NAME, PATIENT_ID, "Quiet"):
        assert identifier not in sent and identifier not in log
    assert '"event": "alert.raised"' in log and '"event": "alert.cleared"' in log
