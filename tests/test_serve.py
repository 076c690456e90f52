"""Serve: DCMTK's findscu, movescu and getscu against a running node.

The node holds a three-slice CT series (no rule wants it: stored only), a JPEG 2000 image
and a phantom chest film, from which the pipeline makes an SR (the rule-out engine). A
C-MOVE goes to DCMTK's storescp, configured as a destination; what arrives there, or with
C-GET, must be the very dataset the node holds.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian

from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.dicom_validation import require_tool
from tests.ingest import dataset_bytes, json_events, sending_as_is, storescp
from tests.peers import REPO, Cadnode, run_cadnode, storescu, wait_for
from tests.synthetic import write_ct_series

FILM_PATIENT = ("Servetest^Ada", "PID-SERVE-7")
VIEWER_AE = "STORESCP"  # tests.ingest.storescp's AE title
REFUSED = "DataSetDoesNotMatchSOPClass"  # how DCMTK names status 0xA900
MOVED = "Final Move Response (Success)"  # no failed or warning sub-operations


@dataclass
class Held:
    node: Cadnode
    viewer: Path  # where storescp writes what it receives
    ct: list[Dataset]
    jpeg2000: Dataset
    film: Dataset

    def spool_file(self, ds: Dataset) -> Path:
        return (
            self.node.data_dir
            / "spool"
            / ds.StudyInstanceUID
            / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm"
        )


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Held]:
    folder = tmp_path_factory.mktemp("serve")
    with storescp(folder / "viewer") as viewer_port:
        config = {
            "dicom": {"ae_title": "CADNODE"},
            "engines": {"dir": str(REPO / "engines")},
            "rules": str(REPO / "config" / "rules.yaml"),
            "destinations": {
                "viewer": {"ae_title": VIEWER_AE, "host": "127.0.0.1", "port": viewer_port}
            },
        }
        (folder / "cadnode.yaml").write_text(json.dumps(config))  # JSON is YAML
        with run_cadnode(folder, None, CADNODE_CONFIG=str(folder / "cadnode.yaml")) as node:
            inputs = folder / "inputs"
            ct_paths = write_ct_series(inputs, 3, size=64, seed=61)
            film = write_chest_radiograph(
                inputs / "film.dcm",
                seed=62,
                size=256,
                patient_name=FILM_PATIENT[0],
                patient_id=FILM_PATIENT[1],
            )
            jpeg2000 = Path(str(get_testdata_file("JPEG2000.dcm")))
            for paths, options in (
                ([*ct_paths, inputs / "film.dcm"], ()),
                ([jpeg2000], sending_as_is(jpeg2000)),
            ):
                done = storescu(node.dicom_port, *paths, options=options)
                assert done.returncode == 0, done.stderr
            wait_for(
                lambda: _state(node, film.StudyInstanceUID) in ("encoded", "delivered"),
                60,
                "the film's SR",
                interval_s=0.2,
            )
            # Held objects are found once their study is complete (the query index is filled
            # as assemble releases it), so every study must be past "received" first.
            studies = {dcmread(ct_paths[0]).StudyInstanceUID, film.StudyInstanceUID}
            studies.add(dcmread(jpeg2000).StudyInstanceUID)
            wait_for(
                lambda: all(_state(node, uid) not in ("", "received") for uid in studies),
                60,
                "every study complete",
                interval_s=0.2,
            )
            yield Held(
                node=node,
                viewer=folder / "viewer",
                ct=[dcmread(p) for p in ct_paths],
                jpeg2000=dcmread(jpeg2000),
                film=film,
            )


def _state(node: Cadnode, study_uid: str) -> str:
    rows = [row for row in node.studies() if row["study_uid"] == study_uid]
    return str(rows[-1]["state"]) if rows else ""


def dcmtk(tool: str, node: Cadnode, *args: str, cwd: Path | None = None) -> str:
    """Run a DCMTK SCU against the node; its exit status and verbose output, as one text."""
    done = subprocess.run(
        [require_tool(tool), "-v", "-aec", "CADNODE", *args, "127.0.0.1", str(node.dicom_port)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}"


def keys(**values: str) -> list[str]:
    return [arg for key, value in values.items() for arg in ("-k", f"{key}={value}")]


def find(held: Held, folder: Path, *args: str, model: str = "-S") -> list[Dataset]:
    folder.mkdir(parents=True, exist_ok=True)
    output = dcmtk("findscu", held.node, model, "-X", "-od", str(folder), *args)
    assert output.startswith("rc=0"), output
    return [dcmread(path) for path in sorted(folder.glob("rsp*.dcm"))]


def test_find_studies_by_wildcard_and_date_range(held: Held, tmp_path: Path) -> None:
    asked = keys(
        QueryRetrieveLevel="STUDY",
        PatientName="Synth*",
        StudyDate="20241201-20250131",
        StudyInstanceUID="",
        ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
    )
    [study] = find(held, tmp_path / "found", *asked)
    assert study.StudyInstanceUID == held.ct[0].StudyInstanceUID
    assert study.PatientName == "Synthetic^Ingest" and study.StudyDate == "20250101"
    assert study.ModalitiesInStudy == "CT"
    assert (study.NumberOfStudyRelatedSeries, study.NumberOfStudyRelatedInstances) == (1, 3)
    returned = {e.keyword for e in study} - {"SpecificCharacterSet"}
    assert returned == {
        "QueryRetrieveLevel",
        "PatientName",
        "StudyDate",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    }
    # Names match whatever their case; other values exactly; ranges; '?' is one character.
    assert find(held, tmp_path / "case", *keys(QueryRetrieveLevel="STUDY", PatientName="synth*"))
    for name, value in (("StudyDate", "20250102-"), ("ModalitiesInStudy", "ct"), ("StudyID", "??")):
        assert not [
            s
            for s in find(held, tmp_path / name, *keys(QueryRetrieveLevel="STUDY", **{name: value}))
            if s.StudyInstanceUID == held.ct[0].StudyInstanceUID
        ]


def test_find_the_result_at_series_and_image_level(held: Held, tmp_path: Path) -> None:
    study_uid = held.film.StudyInstanceUID
    [study] = find(
        held,
        tmp_path / "study",
        *keys(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid, ModalitiesInStudy="SR"),
    )
    modalities = {held.film.Modality, *(r.Modality for r in _results_of(held, study_uid))}
    assert set(study.ModalitiesInStudy) == modalities
    series = find(
        held,
        tmp_path / "series",
        *keys(
            QueryRetrieveLevel="SERIES",
            StudyInstanceUID=study_uid,
            Modality="",
            SeriesInstanceUID="",
        ),
    )
    by_modality = {s.Modality: s for s in series}
    assert set(by_modality) == modalities
    assert all(s.QueryRetrieveLevel == "SERIES" and s.StudyInstanceUID == study_uid for s in series)
    [report] = find(
        held,
        tmp_path / "image",
        *keys(
            QueryRetrieveLevel="IMAGE",
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=by_modality["SR"].SeriesInstanceUID,
            SOPInstanceUID="",
            SOPClassUID="",
            PatientID="",
        ),
    )
    assert report.PatientID == FILM_PATIENT[1]
    sr = dcmread(_result_file(held, report.SOPInstanceUID))
    assert report.SOPClassUID == sr.SOPClassUID


def test_find_refuses_identifiers_outside_the_model(held: Held) -> None:
    no_level = dcmtk("findscu", held.node, "-S", *keys(PatientName=""))
    assert REFUSED in no_level, no_level
    no_study = dcmtk(
        "findscu", held.node, "-S", *keys(QueryRetrieveLevel="SERIES", SeriesInstanceUID="")
    )
    assert REFUSED in no_study, no_study
    unknown_level = dcmtk("findscu", held.node, "-S", *keys(QueryRetrieveLevel="PATIENT"))
    assert REFUSED in unknown_level, unknown_level


def test_patient_root_finds_the_patient(held: Held, tmp_path: Path) -> None:
    [patient] = find(
        held,
        tmp_path / "patient",
        *keys(
            QueryRetrieveLevel="PATIENT",
            PatientID=FILM_PATIENT[1],
            NumberOfPatientRelatedInstances="",
        ),
        model="-P",
    )
    assert patient.PatientID == FILM_PATIENT[1]
    results = _results_of(held, held.film.StudyInstanceUID)
    assert patient.NumberOfPatientRelatedInstances == 1 + len(results)  # the film, its results


def test_move_sends_the_held_datasets_to_a_configured_destination(held: Held) -> None:
    ct_study = held.ct[0].StudyInstanceUID
    output = move(held, VIEWER_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=ct_study)
    assert output.startswith("rc=0") and MOVED in output, output
    for ds in held.ct:
        assert dataset_bytes(moved(held, ds.SOPInstanceUID)) == dataset_bytes(held.spool_file(ds))

    [report] = [r for r in _results_of(held, held.film.StudyInstanceUID) if r.Modality == "SR"]
    output = move(
        held,
        VIEWER_AE,
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=held.film.StudyInstanceUID,
        SeriesInstanceUID=report.SeriesInstanceUID,
        SOPInstanceUID=report.SOPInstanceUID,
    )
    assert MOVED in output, output
    arrived = moved(held, report.SOPInstanceUID)
    assert dataset_bytes(arrived) == dataset_bytes(_result_file(held, report.SOPInstanceUID))


def move(held: Held, destination: str, **identifiers: str) -> str:
    """movescu (study root) asking the node to send what `identifiers` match to `destination`."""
    return dcmtk("movescu", held.node, "-S", "-aem", destination, *keys(**identifiers))


def moved(held: Held, sop_instance_uid: str) -> Path:
    """The file the viewer (storescp) wrote for that instance, once it has arrived."""
    files = wait_for(
        lambda: list(held.viewer.glob(f"*{sop_instance_uid}*")), 20, f"{sop_instance_uid} moved"
    )
    first: Path = files[0]
    return first


def test_move_to_an_unknown_destination_fails(held: Held) -> None:
    output = move(
        held, "NOBODY", QueryRetrieveLevel="STUDY", StudyInstanceUID=held.ct[0].StudyInstanceUID
    )
    assert "MoveDestinationUnknown" in output, output  # DCMTK's name for 0xA801


def test_move_refuses_identifiers_outside_the_model(held: Held) -> None:
    """0xA900, as C-FIND answers them, whatever the move destination would take."""
    study = held.ct[0].StudyInstanceUID
    for asked in (
        keys(StudyInstanceUID=study),  # no level
        keys(QueryRetrieveLevel="PATIENT", StudyInstanceUID=study),  # not in study root
        keys(QueryRetrieveLevel="SERIES", SeriesInstanceUID=""),  # no study named
    ):
        output = dcmtk("movescu", held.node, "-S", "-aem", VIEWER_AE, *asked)
        assert REFUSED in output, output


def test_get_sends_on_the_same_association(held: Held, tmp_path: Path) -> None:
    ct = held.ct[0]
    output = dcmtk(
        "getscu",
        held.node,
        "-S",
        "-od",
        str(tmp_path),
        *keys(
            QueryRetrieveLevel="SERIES",
            StudyInstanceUID=ct.StudyInstanceUID,
            SeriesInstanceUID=ct.SeriesInstanceUID,
        ),
    )
    assert output.startswith("rc=0"), output
    for ds in held.ct:
        [arrived] = list(tmp_path.glob(f"*{ds.SOPInstanceUID}*"))
        assert dataset_bytes(arrived) == dataset_bytes(held.spool_file(ds))


def test_retrievals_are_in_the_audit_trail(held: Held, tmp_path: Path) -> None:
    """Who took which study where, for C-MOVE and C-GET alike (the audit trail, not the log)."""
    ct_study = held.ct[0].StudyInstanceUID
    assert move(held, VIEWER_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=ct_study).startswith(
        "rc=0"
    )
    keys_ = keys(QueryRetrieveLevel="STUDY", StudyInstanceUID=ct_study)
    assert dcmtk("getscu", held.node, "-S", "-od", str(tmp_path), *keys_).startswith("rc=0")
    done = held.node.cli("audit", "--since", "1h", "--kind", "retrieved")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    by_way = {e["details"]["destination"].endswith("(C-GET)"): e for e in events}
    moved_event, got_event = by_way[False], by_way[True]
    assert moved_event["details"]["destination"].startswith(f"{VIEWER_AE}@")
    for event in (moved_event, got_event):
        assert event["outcome"] == "sent" and event["details"]["study_uids"] == [ct_study]
        assert event["details"]["completed"] == len(held.ct) and event["details"]["failed"] == 0


def test_get_decompresses_for_a_peer_that_takes_no_jpeg_2000(held: Held, tmp_path: Path) -> None:
    image = held.jpeg2000
    assert image.file_meta.TransferSyntaxUID == JPEG2000
    output = dcmtk(  # getscu proposes the uncompressed transfer syntaxes only
        "getscu",
        held.node,
        "-S",
        "-od",
        str(tmp_path),
        *keys(QueryRetrieveLevel="STUDY", StudyInstanceUID=image.StudyInstanceUID),
    )
    assert output.startswith("rc=0"), output
    [arrived] = [dcmread(p) for p in tmp_path.glob(f"*{image.SOPInstanceUID}*")]
    assert arrived.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert arrived.SOPInstanceUID == image.SOPInstanceUID
    assert (arrived.pixel_array == image.pixel_array).all()


def test_events_name_peers_and_counts_not_patients(held: Held) -> None:
    text = held.node.log_text()
    events = json_events(text)
    names = {event["event"] for event in events}
    assert {"query.find", "retrieve.move", "retrieve.get"} <= names
    counts = ("qr_level", "completed", "failed", "converted")
    moves = [tuple(e.get(k) for k in counts) for e in events if e["event"] == "retrieve.move"]
    gets = [tuple(e.get(k) for k in counts) for e in events if e["event"] == "retrieve.get"]
    assert ("STUDY", 3, 0, 0) in moves and ("IMAGE", 1, 0, 0) in moves
    assert ("SERIES", 3, 0, 0) in gets and ("STUDY", 1, 0, 1) in gets  # the JPEG 2000 image
    unknown = [
        e for e in events if e["event"] == "retrieve.move" and e.get("destination") == "NOBODY"
    ]
    assert [e["outcome"] for e in unknown] == ["move destination unknown"]
    refused = [e for e in events if e["event"] == "retrieve.move" and "status" in e]
    assert {e["status"] for e in refused} == {"0xa900"} and len(refused) == 3
    for identifier in (*FILM_PATIENT, "Synthetic^Ingest", "SYNTH-INGEST"):
        assert identifier not in text


def _results_of(held: Held, study_uid: str) -> list[Dataset]:
    folder = held.node.data_dir / "results" / study_uid
    return [dcmread(path, stop_before_pixels=True) for path in sorted(folder.glob("*.dcm"))]


def _result_file(held: Held, sop_instance_uid: str) -> Path:
    [path] = (held.node.data_dir / "results").rglob(f"{sop_instance_uid}.dcm")
    return path
