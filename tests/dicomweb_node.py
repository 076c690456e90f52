"""A running node holding a chest film with its three results (the rule-out SR, the
segmenter's SEG and SR), or a DBT volume with the detector's SR, its /dicomweb behind a bearer
token: what the DICOMweb query tests (tests/test_dicomweb_query.py) and the OHIF test
(tests/test_ohif.py) ask."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from cadnode.admin.auth import hash_password
from cadnode.infer.phantoms.breast import BreastPhantom, write_tomosynthesis
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import REPO, Cadnode, free_port, run_cadnode, storescu, wait_for

TOKEN = "dicomweb-test-token-0123456789"
PATIENT_NAME, PATIENT_ID = "Webviewer^Wilma", "PID-DICOMWEB-1"
PATIENCE_S = 120


@dataclass
class FilmNode:
    node: Cadnode
    base: str  # the node's DICOMweb root, http://127.0.0.1:PORT/dicomweb
    film: Dataset
    client: DICOMwebClient  # dicomweb-client, with the token


def dicomweb_root(http_port: int) -> str:
    return f"http://127.0.0.1:{http_port}/dicomweb"


@contextmanager
def node_holding_a_film(
    folder: Path,
    destination: str | None,
    cors_origins: list[str],
    http_port: int | None = None,
) -> Iterator[FilmNode]:
    """`cadnode serve` (on `http_port`, where a peer must know it first), the film stored
    by storescu, once the film and its four results are all held."""
    with _serving(folder, destination, cors_origins, http_port) as (node, base, client):
        film = write_chest_radiograph(
            folder / "film.dcm", seed=101, pneumothorax=True, size=256,
            patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
        )  # fmt: skip
        done = storescu(node.dicom_port, folder / "film.dcm")
        assert done.returncode == 0, done.stderr
        wait_for(  # the film, the rule-out SR, the SEG, the segmenter's SR, the findings' SR
            lambda: len(client.search_for_instances(film.StudyInstanceUID)) == 5,
            PATIENCE_S, "the film and its four results held", interval_s=0.5,
        )  # fmt: skip
        yield FilmNode(node, base, film, client)


@dataclass
class VolumeNode:
    node: Cadnode
    base: str  # the node's DICOMweb root
    volume: Dataset  # a Breast Tomosynthesis Image
    phantom: BreastPhantom  # what was planted in it
    client: DICOMwebClient


@contextmanager
def node_holding_a_volume(folder: Path, cors_origins: list[str]) -> Iterator[VolumeNode]:
    """`cadnode serve` holding a DBT volume with one planted mass (a phantom the detector is
    known to find) and the detector's SR, the volume stored by storescu."""
    with _serving(folder, None, cors_origins, None) as (node, base, client):
        path = folder / "dbt.dcm"
        volume, phantom = write_tomosynthesis(path, seed=28, view="LMLO", masses=1,
                                              patient_id=PATIENT_ID)  # fmt: skip
        # OHIF 3.13.2 draws no image that states a VOI LUT Function: its metadata provider
        # gives the value ("LINEAR") where cornerstone's image loader takes the first item of
        # a list ("L"), an "Invalid VOI LUT function". The attribute is optional, and LINEAR
        # what its absence means.
        for item in volume.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence:
            del item.VOILUTFunction
        volume.save_as(path, enforce_file_format=True)
        # -R: only the file's own SOP class; storescu's default contexts lack Breast
        # Tomosynthesis Image.
        done = storescu(node.dicom_port, path, options=("-R",))
        assert done.returncode == 0, done.stderr
        wait_for(  # the volume and the detector's SR
            lambda: len(client.search_for_instances(volume.StudyInstanceUID)) == 2,
            PATIENCE_S, "the volume and its SR held", interval_s=0.5,
        )  # fmt: skip
        yield VolumeNode(node, base, volume, phantom, client)


@contextmanager
def _serving(
    folder: Path, destination: str | None, cors_origins: list[str], http_port: int | None
) -> Iterator[tuple[Cadnode, str, DICOMwebClient]]:
    """`cadnode serve` with its /dicomweb behind TOKEN, and a dicomweb-client on it."""
    http_port = http_port or free_port()
    base = dicomweb_root(http_port)
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "http": {"admin_token_hash": hash_password(TOKEN)},
        "dicomweb": {"cors_origins": cors_origins},
    }
    (folder / "cadnode.yaml").write_text(json.dumps(config))  # JSON is YAML
    with run_cadnode(
        folder / "node", destination, CADNODE_CONFIG=str(folder / "cadnode.yaml"),
        CADNODE_HTTP_PORT=str(http_port),
    ) as node:  # fmt: skip
        client = DICOMwebClient(base, headers={"Authorization": f"Bearer {TOKEN}"})
        yield node, base, client
