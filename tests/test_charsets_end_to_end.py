"""A real node and a real PACS: every valid Specific Character Set yields results.

Chest films (pneumothorax phantoms) carrying the person names of PS3.5 Annex H (Japanese),
I (Korean) and J (Chinese) in the examples' own bytes and character sets are pushed with
DCMTK's storescu; their rule-out SR, the segmenter's SEG and SR, and the findings SR must
reach Orthanc, pass dciodvfy, and hold the name as the standard spells it, as Orthanc
decodes it and as pydicom does; the study moves up the worklist; the log names no one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import Cadnode, Orthanc, run_cadnode, run_orthanc
from tests.test_encode_charsets import BY_ID, Example, assert_kept, carry
from tests.test_end_to_end import push, results_in_pacs, wait_for_state

# The Annex H, I and J examples (Latin-1 and the default repertoire need no PACS to show).
EXAMPLES = [
    BY_ID[name]
    for name in (
        "annex-h-ir87",
        "annex-h-ir13-ir87",
        "annex-i-ir149",
        "annex-j-utf8",
        "annex-j-gb18030",
        "annex-j-ir58",
    )
]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc) -> Iterator[Cadnode]:
    with run_cadnode(tmp_path_factory.mktemp("cadnode"), pacs.destination) as cadnode:
        yield cadnode


def film_in(path: Path, example: Example, seed: int) -> str:
    """A pneumothorax film in the example's encoding, written to `path`; its study UID."""
    film = write_chest_radiograph(
        path, seed=seed, pneumothorax=True, patient_id=f"PID-{example.id}"
    )
    carry(dcmread(path), example).save_as(path, enforce_file_format=True)
    return str(film.StudyInstanceUID)


@pytest.mark.parametrize(
    ("seed", "example"), list(enumerate(EXAMPLES, start=301)), ids=[e.id for e in EXAMPLES]
)
def test_the_results_reach_the_pacs_with_the_name_kept(
    node: Cadnode, pacs: Orthanc, tmp_path: Path, seed: int, example: Example
) -> None:
    study_uid = film_in(tmp_path / "chest.dcm", example, seed)
    push(node, tmp_path / "chest.dcm")
    row = wait_for_state(node, study_uid, "delivered", "failed")
    assert row["state"] == "delivered", row["reason"]
    assert row["priority"] == "HIGH"
    paths = results_in_pacs(pacs, study_uid, 4, tmp_path)  # each one passes dciodvfy
    assert sorted(dcmread(p).Modality for p in paths) == ["SEG", "SR", "SR", "SR"]
    for path in paths:
        assert_kept(dcmread(path), example)
    for orthanc_id in pacs.instances_of_study(study_uid):
        tags = pacs.instance_tags(orthanc_id)
        # Orthanc decodes the UTF-8 name (a trailing empty group is not written).
        assert tags["PatientName"].rstrip("=") == example.name.rstrip("=")
        assert tags["SpecificCharacterSet"] == "ISO_IR 192"
    log = node.log_text()
    named = [part for group in example.groups for part in group.split("^") if part]
    assert [part for part in named if part in log] == []

