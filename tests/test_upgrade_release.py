"""The new code on a data dir written by release ed9fd1e (tests/fixtures/release-ed9fd1e/,
made by that release's own `cadnode serve`: tests/fixtures/make_release_fixture.py).

`cadnode serve` upgrades the database at start; the release's studies are then listed as the
release listed them, found by C-FIND with their results, and a new study goes through every
stage to the PACS.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from pydicom import dcmread

from cadnode.core.migrations import head
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.ingest import json_events, storescp
from tests.peers import REPO, Cadnode, findscu, run_cadnode, storescu, wait_for

RELEASE = Path(__file__).resolve().parent / "fixtures" / "release-ed9fd1e"


def test_the_new_code_serves_a_release_data_dir(tmp_path: Path) -> None:
    with tarfile.open(RELEASE / "var.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")  # tmp_path / "var": run_cadnode's data dir
    released = json.loads((RELEASE / "studies.json").read_text())
    before = db_current(tmp_path / "var")
    assert before.returncode == 1 and "no revision recorded" in before.stdout, before.stdout

    with storescp(tmp_path / "pacs") as pacs_port:
        destination = f"STORESCP@127.0.0.1:{pacs_port}"
        with run_cadnode(tmp_path, destination) as node:
            events = [e["event"] for e in json_events(node.log_text())]
            assert events.index("db.stamped") < events.index("db.upgraded")

            old = {s["study_uid"] for s in released}
            listed = [s for s in node.studies() if s["study_uid"] in old]
            assert as_released(listed) == as_released(released)
            for study in released:  # the query index takes them in once the node is up
                folder = tmp_path / "find" / str(study["job"])
                wait_for(
                    lambda s=study, f=folder: (
                        find_studies(node, f, s["patient_id"]) == [s["study_uid"]]
                    ),
                    30,
                    f"C-FIND to find job {study['job']}'s study by its Patient ID",
                    interval_s=0.5,
                )
                modalities = find_series(node, folder / "series", study["study_uid"])
                assert modalities.count("SR") == len(study["results"]), modalities

            film = write_chest_radiograph(
                tmp_path / "new" / "film.dcm", seed=1800, size=256, patient_id="NEW-AFTER-UPGRADE"
            )
            sent = storescu(node.dicom_port, tmp_path / "new" / "film.dcm")
            assert sent.returncode == 0, sent.stderr
            wait_for(
                lambda: state_of(node, film.StudyInstanceUID) == "delivered",
                120,
                "the new study delivered",
                interval_s=0.5,
            )
            now = node.cli("db", "current")
            assert now.returncode == 0 and f"revision {head()} (head {head()})" in now.stdout
    arrived = {dcmread(p).StudyInstanceUID for p in (tmp_path / "pacs").iterdir()}
    assert film.StudyInstanceUID in arrived


def as_released(studies: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What the release itself said of each job, which the new code must say again."""
    return sorted(
        (
            s["study_uid"],
            s["job"],
            s["version"],
            s["state"],
            s["rule"],
            s["instances"],
            sorted(r["engine"] for r in s["results"]),
            sorted(d["state"] for d in s["deliveries"]),
        )
        for s in studies
    )


def state_of(node: Cadnode, study_uid: str) -> str:
    rows = [row for row in node.studies() if row["study_uid"] == study_uid]
    return str(rows[-1]["state"]) if rows else ""


def db_current(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cadnode.cli", "db", "current"],
        env={"PATH": "/usr/bin:/bin", "CADNODE_DATA_DIR": str(data_dir)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def find_studies(node: Cadnode, folder: Path, patient_id: str) -> list[str]:
    """Study-level C-FIND on a Patient ID: the Study Instance UIDs answered."""
    answers = findscu(
        node.dicom_port,
        folder,
        QueryRetrieveLevel="STUDY",
        PatientID=patient_id,
        StudyInstanceUID="",
    )
    return [str(answer.StudyInstanceUID) for answer in answers]


def find_series(node: Cadnode, folder: Path, study_uid: str) -> list[str]:
    """Series-level C-FIND in a study: each series' modality (the film's, the results')."""
    answers = findscu(
        node.dicom_port,
        folder,
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=study_uid,
        Modality="",
    )
    return sorted(str(answer.Modality) for answer in answers)
