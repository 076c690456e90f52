"""Worklist priority against real peers: cadnode serves, a pynetdicom worklist client queries
and subscribes, hl7apy's MLLP server plays the RIS, an HTTP server takes the webhook.

The RIS is down when the node starts and comes back later: its messages wait in the outbox.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import Cadnode, free_port, run_cadnode, storescu, wait_for
from tests.worklist_peers import (
    MllpListener,
    UpsPushScp,
    WebhookReceiver,
    WorklistClient,
    priority_config,
    study_query,
)

CHANGE_STATE = 1
SUCCESS, WRONG_TRANSACTION_UID, UNKNOWN_RECEIVING_AE = 0x0000, 0xC301, 0xC308


@pytest.fixture(scope="module")
def client() -> Iterator[WorklistClient]:
    with WorklistClient() as worklist_client:
        yield worklist_client


@pytest.fixture(scope="module")
def webhook() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def ris_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def external() -> Iterator[UpsPushScp]:
    with UpsPushScp() as scp:
        yield scp


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory,
    client: WorklistClient,
    webhook: WebhookReceiver,
    ris_port: int,
    external: UpsPushScp,
) -> Iterator[Cadnode]:
    folder = tmp_path_factory.mktemp("worklist")
    config = priority_config(
        folder, watcher=client, hl7_port=ris_port, webhook_url=webhook.url, push_to=external
    )
    with run_cadnode(folder, None, CADNODE_CONFIG=str(config)) as cadnode:
        assert client.subscribe(cadnode.dicom_port) == SUCCESS  # to every workitem
        yield cadnode


def push(node: Cadnode, folder: Path, seed: int, **kind: Any) -> Dataset:
    film = write_chest_radiograph(folder / f"{seed}.dcm", seed=seed, size=256, **kind)
    done = storescu(node.dicom_port, folder / f"{seed}.dcm")
    assert done.returncode == 0, done.stderr
    return film


def workitem_of(client: WorklistClient, node: Cadnode, study_uid: str) -> Dataset:
    [found] = client.find(node.dicom_port, study_query(study_uid))
    return found


def study_row(node: Cadnode, study_uid: str) -> dict[str, Any]:
    return next(row for row in node.studies() if row["study_uid"] == study_uid)


def test_a_worklist_client_finds_the_workitem_and_hears_its_priority_change(
    node: Cadnode, client: WorklistClient, tmp_path: Path
) -> None:
    film = push(node, tmp_path, seed=801, pneumothorax=True)
    found = wait_for(
        lambda: client.find(node.dicom_port, study_query(film.StudyInstanceUID)),
        30,
        "the workitem on the worklist",
    )
    uid = found[0].SOPInstanceUID
    client.wait_for_event(
        lambda e: e.workitem == uid and e.info.ScheduledProcedureStepPriority == "HIGH"
    )
    reports = [
        (e.event_type, e.info.ProcedureStepState, e.info.ScheduledProcedureStepPriority)
        for e in client.events_for(uid)
    ]
    assert reports[0] == (1, "SCHEDULED", "MEDIUM")  # created: MEDIUM until results come
    assert reports[-1] == (1, "SCHEDULED", "HIGH")

    item = workitem_of(client, node, film.StudyInstanceUID)
    assert item.ScheduledProcedureStepPriority == "HIGH"
    assert item.ReferencedRequestSequence[0].AccessionNumber == film.AccessionNumber
    assert item.ReferencedRequestSequence[0].StudyInstanceUID == film.StudyInstanceUID
    [series] = item.InputInformationSequence
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID
    # The segmenter measured the pneumothorax: the policy's first rule says why it is HIGH.
    assert "pneumothorax above 10 %" in item.CommentsOnTheScheduledProcedureStep
    status, attributes = client.get(node.dicom_port, uid, [0x00741200, 0x00741000])
    assert status == SUCCESS and attributes is not None
    assert attributes.ScheduledProcedureStepPriority == "HIGH"

    history = study_row(node, film.StudyInstanceUID)["priority_history"]
    assert [(h["priority"], h["rule"]) for h in history] == [
        ("MEDIUM", "arrival"),
        ("HIGH", "pneumothorax-large"),
    ]
    assert "MEDIUM" in node.cli("studies").stdout.split("priority:")[-1]


def test_a_reader_claims_the_workitem_and_subscribers_hear_it(
    node: Cadnode, client: WorklistClient, tmp_path: Path
) -> None:
    film = push(node, tmp_path, seed=802)
    uid = wait_for(
        lambda: client.find(node.dicom_port, study_query(film.StudyInstanceUID)),
        30,
        "the workitem",
    )[0].SOPInstanceUID
    claim = Dataset()
    claim.ProcedureStepState = "IN PROGRESS"
    claim.TransactionUID = generate_uid()
    assert client.action(node.dicom_port, uid, CHANGE_STATE, claim) == SUCCESS
    client.wait_for_event(
        lambda e: e.workitem == uid and e.info.ProcedureStepState == "IN PROGRESS"
    )
    done = Dataset()
    done.ProcedureStepState = "COMPLETED"
    done.TransactionUID = generate_uid()  # not the lock holder's
    assert client.action(node.dicom_port, uid, CHANGE_STATE, done) == WRONG_TRANSACTION_UID
    assert workitem_of(client, node, film.StudyInstanceUID).ProcedureStepState == "IN PROGRESS"


def test_only_configured_aes_may_subscribe(node: Cadnode) -> None:
    stranger = WorklistClient(ae_title="STRANGER")
    assert stranger.subscribe(node.dicom_port) == UNKNOWN_RECEIVING_AE


def test_the_webhook_gets_the_change(
    node: Cadnode, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    film = push(node, tmp_path, seed=803, opacity=True)

    def posted() -> Any:
        return [p for p in webhook.posts if p[1]["study_instance_uid"] == film.StudyInstanceUID]

    [(_, body, headers)] = wait_for(posted, 30, "the webhook POST")
    assert body["priority"] == "HIGH" and body["previous_priority"] == "MEDIUM"
    assert body["accession_number"] == film.AccessionNumber
    assert body["rule"] == "chest-urgent" and body["reason"]
    assert headers["Idempotency-Key"].startswith("cadnode-publication-")


def test_the_ris_gets_the_order_update_once_it_is_back(
    node: Cadnode, ris_port: int, tmp_path: Path
) -> None:
    film = push(node, tmp_path, seed=804)  # a normal film: LOW

    def waiting() -> Any:
        row = study_row(node, film.StudyInstanceUID)
        hl7 = [p for p in row["publications"] if p["channel"] == "hl7"]
        return hl7 and hl7[0]["attempts"] >= 2 and hl7[0]

    pending = wait_for(waiting, 30, "the HL7 message to be retried", interval_s=0.2)
    assert pending["state"] == "pending" and "refused" in pending["last_error"].lower()

    ris = MllpListener(ris_port).start()
    try:

        def received() -> Any:
            return [
                m.message
                for m in ris.messages
                if m.message.omi_o23_order.ipc.ipc_3.to_er7() == film.StudyInstanceUID
            ]

        [message] = wait_for(received, 30, "the order update at the RIS")
        order = message.omi_o23_order
        assert order.omi_o23_timing.tq1.tq1_9.to_er7() == "R"  # LOW: routine by default
        assert order.obr.obr_5.to_er7() == "R"
        assert order.ipc.ipc_1.to_er7() == film.AccessionNumber
        assert "LOW" in order.nte.nte_3.to_er7()
        sent = wait_for(
            lambda: all(
                p["state"] == "sent"
                for p in study_row(node, film.StudyInstanceUID)["publications"]
                if p["channel"] == "hl7"
            ),
            30,
            "the ACK to be recorded",
        )
        assert sent
    finally:
        ris.stop()


def test_the_workitem_is_pushed_to_another_worklist_manager(
    node: Cadnode, client: WorklistClient, external: UpsPushScp, tmp_path: Path
) -> None:
    film = push(node, tmp_path, seed=805, pneumothorax=True)
    uid = wait_for(
        lambda: client.find(node.dicom_port, study_query(film.StudyInstanceUID)),
        30,
        "the workitem",
    )[0].SOPInstanceUID

    def pushed_high() -> Any:
        mine = [(op, ds) for op, u, ds in external.requests if u == uid]
        return mine and mine[-1][1].ScheduledProcedureStepPriority == "HIGH" and mine

    requests = wait_for(pushed_high, 30, "the workitem pushed, then at priority HIGH")
    first, created = requests[0]
    # MEDIUM at arrival; when the result lands before the N-CREATE has gone out, the outbox
    # sends the newer priority instead of the stale one, so HIGH is right too.
    assert first == "N-CREATE" and created.ScheduledProcedureStepPriority in ("MEDIUM", "HIGH")
    assert created.ProcedureStepState == "SCHEDULED"
    assert created.ReferencedRequestSequence[0].StudyInstanceUID == film.StudyInstanceUID
    assert [op for op, _ in requests[1:]] == ["N-SET"] * (len(requests) - 1)
    if created.ScheduledProcedureStepPriority == "MEDIUM":
        assert len(requests) >= 2
