"""A running node holding a chest film with its three results (the rule-out SR, the
segmenter's SEG and SR), its /dicomweb behind a bearer token: what the DICOMweb query tests
(tests/test_dicomweb_query.py) and the OHIF test (tests/test_ohif.py) ask."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from cadnode.admin.auth import hash_password
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
    by storescu, once the film and its three results are all held."""
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
        film = write_chest_radiograph(
            folder / "film.dcm", seed=101, pneumothorax=True, size=256,
            patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
        )  # fmt: skip
        done = storescu(node.dicom_port, folder / "film.dcm")
        assert done.returncode == 0, done.stderr
        client = DICOMwebClient(base, headers={"Authorization": f"Bearer {TOKEN}"})
        wait_for(  # the film, the rule-out SR, the SEG and the segmenter's SR
            lambda: len(client.search_for_instances(film.StudyInstanceUID)) == 4,
            PATIENCE_S, "the film and its three results held", interval_s=0.5,
        )  # fmt: skip
        yield FilmNode(node, base, film, client)
