"""The walking skeleton against real peers: DCMTK pushes, Orthanc is the PACS.

A phantom chest radiograph pushed with `storescu` comes back as a TID 1500 SR in Orthanc
that dciodvfy accepts; an image no rule wants is stored and ignored; a delivery pending
when the node stops is sent after it restarts, once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes

from cadnode.infer.bundle import Bundle
from tests.dicom_validation import dciodvfy_errors
from tests.peers import (
    REPO,
    Cadnode,
    Orthanc,
    echoscu,
    free_port,
    run_cadnode,
    run_orthanc,
    storescu,
    wait_for,
)
from training.phantoms import write_chest_radiograph

PATIENT_NAME, PATIENT_ID = "Testpatient^Wilhelmina", "PID-E2E-7731"
RULEOUT = Bundle(REPO / "engines" / "cxr-ruleout").manifest


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc) -> Iterator[Cadnode]:
    with run_cadnode(tmp_path_factory.mktemp("cadnode"), pacs.destination) as cadnode:
        yield cadnode


def push(node: Cadnode, path: Path) -> None:
    done = storescu(node.dicom_port, path)
    assert done.returncode == 0, done.stderr


def study_row(node: Cadnode, study_uid: str) -> dict[str, Any]:
    rows = [row for row in node.studies() if row["study_uid"] == study_uid]
    return rows[-1] if rows else {}


def wait_for_state(node: Cadnode, study_uid: str, *states: str) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (r := study_row(node, study_uid)) and r["state"] in states and r,
            30,
            f"study in state {states}",
            interval_s=0.2,
        )
    )


def test_echo(node: Cadnode) -> None:
    assert echoscu(node.dicom_port).returncode == 0


def test_a_chest_radiograph_comes_back_as_a_valid_sr_in_the_pacs(
    node: Cadnode, pacs: Orthanc, tmp_path: Path
) -> None:
    film = write_chest_radiograph(
        tmp_path / "chest.dcm",
        seed=101,
        opacity=True,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
    )
    push(node, tmp_path / "chest.dcm")

    [orthanc_id] = wait_for(
        lambda: pacs.instances_of_study(film.StudyInstanceUID),
        30,
        "the SR to reach Orthanc",
        interval_s=0.1,
    )
    path = pacs.download(orthanc_id, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []

    sr = hd.sr.srread(path)
    assert sr.Modality == "SR" and sr.PatientID == PATIENT_ID
    [group] = sr.content.get_image_measurement_groups()
    [source] = group.source_images
    assert source.referenced_sop_instance_uid == film.SOPInstanceUID
    [measurement] = group.get_measurements(name=codes.DCM.Probability)

    row = wait_for_state(node, film.StudyInstanceUID, "delivered")
    [result] = row["results"]
    assert result["engine"] == "cxr-ruleout" and result["version"] == RULEOUT.version
    assert measurement.value == pytest.approx(result["probability"])
    expected = codes.SCT.Normal if result["ruled_out"] else codes.SCT.Abnormal
    assert group.finding_type == expected
    assert algorithm_texts(sr, codes.DCM.AlgorithmName) >= {"cxr-ruleout"}
    assert algorithm_texts(sr, codes.DCM.AlgorithmVersion) >= {RULEOUT.version}
    assert [d["state"] for d in row["deliveries"]] == ["sent"]


def test_an_image_no_rule_wants_is_stored_and_ignored(
    node: Cadnode, pacs: Orthanc, tmp_path: Path
) -> None:
    lateral = write_chest_radiograph(tmp_path / "lateral.dcm", seed=102, view="LL")
    push(node, tmp_path / "lateral.dcm")

    row = wait_for_state(node, lateral.StudyInstanceUID, "ignored", "failed")
    assert row["state"] == "ignored" and row["rule"] == "everything-else"
    assert "ignores it" in row["reason"]
    assert row["results"] == [] and row["deliveries"] == []
    assert pacs.instances_of_study(lateral.StudyInstanceUID) == []
    stored = list((node.data_dir / "spool" / lateral.StudyInstanceUID).rglob("*.dcm"))
    assert [dcmread(p).SOPInstanceUID for p in stored] == [lateral.SOPInstanceUID]
    assert '"event": "job.ignored"' in node.log_text()


def test_logs_carry_no_patient_identifiers(node: Cadnode) -> None:
    log = node.log_text()
    assert '"event": "instance.received"' in log  # the pushes above did happen
    for identifier in (PATIENT_NAME, PATIENT_ID, "Testpatient", "Wilhelmina"):
        assert identifier not in log


def test_the_audit_trail_names_whose_study_came_and_where_its_result_went(
    node: Cadnode, pacs: Orthanc
) -> None:
    """What the logs must not say, the audit trail (`cadnode audit`) does, for those allowed."""
    done = node.cli("audit", "--since", "1h")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    received = [e for e in events if e["kind"] == "study.received"]
    assert any(e["details"]["PatientID"] == PATIENT_ID for e in received)
    assert all(e["actor"] == "MODALITY" for e in received)
    delivered = [e for e in events if e["kind"] == "result.delivered"]
    assert delivered and delivered[0]["address"] == pacs.destination
    assert {"association", "engine", "rules"} <= {e["kind"] for e in events}


def test_a_pending_delivery_survives_a_restart_and_arrives_once(tmp_path: Path) -> None:
    pacs_port = free_port()  # nothing listens here until the PACS comes up
    film = write_chest_radiograph(tmp_path / "chest.dcm", seed=103)
    destination = f"ORTHANC@127.0.0.1:{pacs_port}"

    with run_cadnode(tmp_path / "node", destination) as node:
        push(node, tmp_path / "chest.dcm")
        wait_for(
            lambda: any(
                d["attempts"] >= 1
                for d in study_row(node, film.StudyInstanceUID).get("deliveries", [])
            ),
            30,
            "a failed delivery attempt",
            interval_s=0.2,
        )
        row = study_row(node, film.StudyInstanceUID)
        assert row["state"] == "encoded"
        assert row["deliveries"][0]["state"] == "pending"
        assert "association not established" in row["deliveries"][0]["last_error"]

    with (
        run_orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs,
        run_cadnode(tmp_path / "node", destination) as node,
    ):
        wait_for_state(node, film.StudyInstanceUID, "delivered")
        assert len(pacs.instances_of_study(film.StudyInstanceUID)) == 1
        assert "delivery.retry_scheduled" in (tmp_path / "node" / "cadnode.log").read_text()


def algorithm_texts(sr: Dataset, name: Any) -> set[str]:
    found = hd.sr.utils.find_content_items(sr, name=name, recursive=True)
    return {str(item.TextValue) for item in found}
