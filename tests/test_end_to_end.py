"""The walking skeleton against real peers: DCMTK pushes, Orthanc is the PACS.

A phantom chest radiograph pushed with `storescu` comes back in Orthanc as the rule-out
filter's TID 1500 SR and, unless it was ruled out, the segmenter's SEG and SR and the chest
findings engine's SR; a DBT volume
as the detector's SR with its findings on their frames; every object passes dciodvfy. An
image no rule wants is stored and ignored; a delivery pending when the node stops is sent
after it restarts, once.
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
from cadnode.infer.phantoms.breast import write_tomosynthesis
from cadnode.infer.phantoms.chest import write_chest_radiograph
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

PATIENT_NAME, PATIENT_ID = "Testpatient^Wilhelmina", "PID-E2E-7731"
RULEOUT = Bundle(REPO / "engines" / "cxr-ruleout").manifest
# Every wait is on its condition (a row in a state, objects in Orthanc); this only bounds it,
# generously, for a loaded machine.
PATIENCE_S = 120


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc) -> Iterator[Cadnode]:
    with run_cadnode(tmp_path_factory.mktemp("cadnode"), pacs.destination) as cadnode:
        yield cadnode


def push(node: Cadnode, path: Path) -> None:
    # -R: propose only the file's own SOP class; storescu's default list of contexts lacks
    # the newer ones (Breast Tomosynthesis Image).
    done = storescu(node.dicom_port, path, options=("-R",))
    assert done.returncode == 0, done.stderr


def study_row(node: Cadnode, study_uid: str) -> dict[str, Any]:
    rows = [row for row in node.studies() if row["study_uid"] == study_uid]
    return rows[-1] if rows else {}


def wait_for_state(node: Cadnode, study_uid: str, *states: str) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (r := study_row(node, study_uid)) and r["state"] in states and r,
            PATIENCE_S,
            f"study in state {states}",
            interval_s=0.2,
        )
    )


def test_echo(node: Cadnode) -> None:
    assert echoscu(node.dicom_port).returncode == 0


def results_in_pacs(pacs: Orthanc, study_uid: str, count: int, folder: Path) -> list[Path]:
    """Wait for `count` result objects of the study in Orthanc; download each, dciodvfy it."""
    orthanc_ids = wait_for(
        lambda: (found := pacs.instances_of_study(study_uid)) and len(found) >= count and found,
        PATIENCE_S,
        f"{count} result object(s) in Orthanc",
        interval_s=0.1,
    )
    assert len(orthanc_ids) == count  # and no more, ever: UIDs are stable per job and engine
    paths = [pacs.download(i, folder / f"result-{n}.dcm") for n, i in enumerate(orthanc_ids)]
    for path in paths:
        assert dciodvfy_errors(path) == [], path
    return paths


def report_of(paths: list[Path], engine: str) -> hd.sr.Comprehensive3DSR:
    [report] = [
        sr
        for sr in (hd.sr.srread(p) for p in paths if dcmread(p).Modality == "SR")
        if engine in algorithm_texts(sr, codes.DCM.AlgorithmName)
    ]
    return report


def test_a_pneumothorax_film_comes_back_as_srs_and_a_seg_in_the_pacs(
    node: Cadnode, pacs: Orthanc, tmp_path: Path
) -> None:
    """The cascade on an abnormal film: the rule-out SR, then the segmenter's SEG and its SR
    measuring the pneumothorax on the SEG's segment, and the findings engine's SR, all valid,
    all in the PACS once."""
    film = write_chest_radiograph(
        tmp_path / "chest.dcm",
        seed=101,
        pneumothorax=True,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
    )
    push(node, tmp_path / "chest.dcm")
    row = wait_for_state(node, film.StudyInstanceUID, "delivered", "failed")
    assert row["state"] == "delivered", row["reason"]
    paths = results_in_pacs(pacs, film.StudyInstanceUID, 4, tmp_path)

    ruleout = report_of(paths, "cxr-ruleout")
    assert ruleout.PatientID == PATIENT_ID
    [group] = ruleout.content.get_image_measurement_groups()
    [source] = group.source_images
    assert source.referenced_sop_instance_uid == film.SOPInstanceUID
    assert group.finding_type == codes.SCT.Abnormal
    [probability] = group.get_measurements(name=codes.DCM.Probability)
    by_engine = {r["engine"]: r for r in row["results"]}
    assert set(by_engine) == {"cxr-ruleout", "cxr-segmenter", "cxr-findings"}
    assert by_engine["cxr-ruleout"]["version"] == RULEOUT.version
    assert probability.value == pytest.approx(by_engine["cxr-ruleout"]["probability"])
    assert algorithm_texts(ruleout, codes.DCM.AlgorithmVersion) >= {RULEOUT.version}

    [seg_path] = [p for p in paths if dcmread(p).Modality == "SEG"]
    seg = hd.seg.segread(seg_path)
    labels = [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence]
    assert labels == ["3341006", "44029006", "36118008"]  # right lung, left lung, pneumothorax
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID \
        == film.SOPInstanceUID
    masks = seg.get_pixels_by_source_instance([film.SOPInstanceUID], segment_numbers=[1, 2, 3])
    assert masks[0].any(axis=(0, 1)).all()  # both lungs and the pneumothorax were found

    segmenter = report_of(paths, "cxr-segmenter")
    ptx = segmenter.content.get_planar_roi_measurement_groups()[2]
    [presence] = ptx.get_qualitative_evaluations()
    assert presence.value == codes.SCT.Present
    [area] = ptx.get_measurements(name=codes.SCT.Area)
    assert area.value > 0 and area.unit == codes.UCUM.SquareMillimeter
    reference = ptx.referenced_segmentation_frame
    assert reference is not None
    assert reference[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert {d["state"] for d in row["deliveries"]} == {"sent"} and len(row["deliveries"]) == 4
    findings = report_of(paths, "cxr-findings")  # a coded finding per reported label
    [verdict, *reported] = findings.content.get_image_measurement_groups()
    assert verdict.finding_type == codes.SCT.Abnormal
    assert all(g.get_qualitative_evaluations()[0].value == codes.SCT.Present for g in reported)
    assert row["priority"] == "HIGH"  # a pneumothorax moves the study up the worklist
    table = node.cli("studies").stdout
    assert "cxr-ruleout: abnormal (p=" in table
    assert "cxr-segmenter: right lung, left lung, pneumothorax (" in table


def test_a_normal_film_is_ruled_out_and_never_segmented(
    node: Cadnode, pacs: Orthanc, tmp_path: Path
) -> None:
    film = write_chest_radiograph(tmp_path / "normal.dcm", seed=104)
    push(node, tmp_path / "normal.dcm")
    row = wait_for_state(node, film.StudyInstanceUID, "delivered", "failed")
    assert [(r["engine"], r["ruled_out"]) for r in row["results"]] == [("cxr-ruleout", True)]
    [path] = results_in_pacs(pacs, film.StudyInstanceUID, 1, tmp_path)
    [group] = report_of([path], "cxr-ruleout").content.get_image_measurement_groups()
    assert group.finding_type == codes.SCT.Abnormal  # what its probability is of
    [decision] = group.get_qualitative_evaluations()
    assert (decision.name, decision.value) == (codes.DCM.Normality, codes.SCT.Normal)
    assert row["priority"] == "LOW"


def test_a_tomosynthesis_volume_comes_back_with_its_findings_on_their_frames(
    node: Cadnode, pacs: Orthanc, tmp_path: Path
) -> None:
    path = tmp_path / "dbt.dcm"
    volume, phantom = write_tomosynthesis(path, seed=28, view="LMLO", masses=1)
    push(node, path)
    row = wait_for_state(node, volume.StudyInstanceUID, "delivered", "failed")
    assert row["state"] == "delivered", row["reason"]
    assert row["rule"] == "breast-tomosynthesis"
    [result] = row["results"]
    assert result["engine"] == "dbt-detector"
    [sr_path] = results_in_pacs(pacs, volume.StudyInstanceUID, 1, tmp_path)
    groups = report_of([sr_path], "dbt-detector").content.get_planar_roi_measurement_groups()
    assert groups, "the detector reported no finding on a volume it is known to find"
    [mass] = phantom.masses
    frames = []
    for group in groups:
        image = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == volume.SOPInstanceUID
        frames.append(int(image.ReferencedFrameNumber))
        assert 1 <= frames[-1] <= int(volume.NumberOfFrames)
    # A finding is drawn on the planted mass's central slice (0-based), give or take the few
    # slices a mass is in focus on.
    assert any(abs(frame - 1 - mass.slice) <= 3 for frame in frames), (frames, mass)


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
    events = wait_for(
        lambda: (found := audit_events(node)) and any(
            e["kind"] == "result.delivered" for e in found
        ) and found,
        PATIENCE_S,
        "the deliveries in the audit trail",
        interval_s=0.2,
    )
    received = [e for e in events if e["kind"] == "study.received"]
    assert any(e["details"]["PatientID"] == PATIENT_ID for e in received)
    assert all(e["actor"] == "MODALITY" for e in received)
    delivered = [e for e in events if e["kind"] == "result.delivered"]
    assert delivered and delivered[0]["address"] == pacs.destination
    assert {"association", "engine", "rules"} <= {e["kind"] for e in events}


def audit_events(node: Cadnode) -> list[dict[str, Any]]:
    done = node.cli("audit", "--since", "1h")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_pending_delivery_survives_a_restart_and_arrives_once(tmp_path: Path) -> None:
    pacs_port = free_port()  # nothing listens here until the PACS comes up
    film = write_chest_radiograph(tmp_path / "chest.dcm", seed=103)
    destination = f"ORTHANC@127.0.0.1:{pacs_port}"

    with run_cadnode(tmp_path / "node", destination) as node:
        push(node, tmp_path / "chest.dcm")
        row = wait_for(
            lambda: (r := study_row(node, film.StudyInstanceUID)) and any(
                d["attempts"] >= 1 for d in r.get("deliveries", [])
            ) and r,
            PATIENCE_S,
            "a failed delivery attempt",
            interval_s=0.2,
        )
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
