"""STOW-RS receive against a running `cadnode serve`, with dicomweb-client as the client.

A film stored by STOW-RS is routed and its SR delivered to the PACS (Orthanc) as a C-STORE'd
one would be; a 300-instance CT study in one request and in chunks of 50 is stored whole, as
one job; a corrupt part fails alone (202); a study-UID mismatch fails its part; without a
token the request is answered 401 before its body is sent; over the limit 413 unread; a
wrong content type 415; an Accept it cannot meet 406.
"""

from __future__ import annotations

import io
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.uid import generate_uid

from cadnode.admin.auth import hash_password
from cadnode.core.db import Database
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.ingest.receive import Intake, Offer, Scratch
from cadnode.ingest.spool import Spool
from cadnode.ingest.stow import Parts
from tests.peers import REPO, Cadnode, Orthanc, port_open, run_cadnode, run_orthanc, wait_for
from tests.synthetic import write_ct_series
from tests.test_ingest_tls import make_pki

TOKEN = "stow-test-token-" + "x" * 24
CLIENT = "STOWTEST"
MAX_REQUEST_MB = 16
PATIENCE_S = 120


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc) -> Iterator[Cadnode]:
    folder = tmp_path_factory.mktemp("stow")
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "dicomweb": {"clients": {CLIENT: hash_password(TOKEN)}, "max_request_mb": MAX_REQUEST_MB},
    }
    (folder / "cadnode.yaml").write_text(json.dumps(config))  # JSON is YAML
    with run_cadnode(
        folder / "node", pacs.destination, CADNODE_CONFIG=str(folder / "cadnode.yaml")
    ) as cadnode:
        wait_for(lambda: _healthy(cadnode), 30, "the node's HTTP port")
        yield cadnode


def _healthy(node: Cadnode) -> bool:
    try:
        return requests.get(f"{_root(node)}/healthz", timeout=5).ok
    except requests.ConnectionError:
        return False


def _root(node: Cadnode) -> str:
    return f"http://127.0.0.1:{node.http_port}"


def client(node: Cadnode) -> DICOMwebClient:
    return DICOMwebClient(f"{_root(node)}/dicomweb", headers={"Authorization": f"Bearer {TOKEN}"})


def multipart(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), part)
        for part in parts
    )
    body += b"--%s--\r\n" % boundary.encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def post(node: Cadnode, parts: list[bytes], path: str = "/dicomweb/studies", **headers: str) -> Any:
    body, content_type = multipart(parts)
    return requests.post(
        f"{_root(node)}{path}",
        data=body,
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": content_type,
            "Accept": "application/dicom+json",
            **headers,
        },
        timeout=60,
    )


def uids_in(answer: dict[str, Any], sequence: str) -> dict[str, dict[str, Any]]:
    """The items of a response's sequence (ReferencedSOPSequence 00081199, FailedSOPSequence
    00081198) by their SOP Instance UID."""
    items = answer.get(sequence, {}).get("Value", [])
    return {item["00081155"]["Value"][0]: item for item in items}


def jobs_of(node: Cadnode, study_uid: str) -> list[dict[str, Any]]:
    return [row for row in node.studies() if row["study_uid"] == study_uid]


def wait_for_instances(node: Cadnode, study_uid: str, count: int) -> list[dict[str, Any]]:
    return list(
        wait_for(
            lambda: (rows := jobs_of(node, study_uid)) and rows[-1]["instances"] >= count and rows,
            PATIENCE_S,
            f"{count} instances of the study indexed",
            interval_s=0.2,
        )
    )


def parts_of(database: Database, folder: Path, max_part_bytes: int = 2**30) -> Parts:
    """The request-side parser over a real spool and index, as a STOW-RS request uses it."""
    spool = Spool(folder, database, 0)
    intake = Intake(spool, Scratch(folder, 2**30), database, lambda: None)
    return Parts(intake, b"b0und", Offer("", "", "", CLIENT, "CADNODE", "x:1"), max_part_bytes)


def fed(parts: Parts, body: bytes, chunk: int = 997) -> Parts:
    for start in range(0, len(body), chunk):  # odd chunks: meta and boundaries split
        parts.feed(body[start : start + chunk])
    return parts


def part(content: bytes, kind: bytes = b"application/dicom") -> bytes:
    return b"--b0und\r\nContent-Type: %s\r\n\r\n%s\r\n" % (kind, content)


def test_parts_after_a_preamble_and_without_a_preamble_are_stored(
    database: Database, tmp_path: Path
) -> None:
    files = write_ct_series(tmp_path / "ct", 3, size=32, seed=37)
    headerless = files[1].read_bytes()[132:]  # File Meta Information, no preamble or DICM
    # What pydicom (so dicomweb-client) writes for a dataset read from no file: the meta
    # group without its (0002,0000) group length, and no preamble.
    read = dcmread(files[2])
    plain = Dataset(read)
    plain.file_meta = read.file_meta
    del plain.file_meta.FileMetaInformationGroupLength
    written = io.BytesIO()
    dcmwrite(written, plain)
    lengthless = written.getvalue()
    assert lengthless[:2] == b"\x02\x00" and lengthless[2:4] != b"\x00\x00"  # as said
    body = b"a preamble\r\n" + part(files[0].read_bytes()) + part(headerless)
    body += part(lengthless) + b"--b0und--"
    parts = fed(parts_of(database, tmp_path / "spool"), body)
    assert parts.ended
    assert [o.failure for o in parts.outcomes] == [None, None, None]
    assert {o.sop_instance_uid for o in parts.outcomes} == {
        dcmread(f).SOPInstanceUID for f in files
    }
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 3


def test_a_part_too_large_or_not_dicom_fails_alone(database: Database, tmp_path: Path) -> None:
    small, large = write_ct_series(tmp_path / "small", 1, size=16, seed=38) + write_ct_series(
        tmp_path / "large", 1, size=128, seed=39
    )
    body = part(large.read_bytes()) + part(b"{}", b"application/json")
    body += part(small.read_bytes()) + b"--b0und--"
    parts = fed(parts_of(database, tmp_path / "spool", max_part_bytes=16 * 2**10), body)
    assert [o.failure for o in parts.outcomes] == [0xA700, 0xC000, None]
    assert list((tmp_path / "spool").glob(".stow-*")) == []  # scratch files: gone


def test_a_stored_film_is_routed_and_its_sr_delivered(
    node: Cadnode, pacs: Orthanc, tmp_path: Path
) -> None:
    film = write_chest_radiograph(tmp_path / "film.dcm", seed=211, size=256)
    answer = client(node).store_instances([dcmread(tmp_path / "film.dcm")])
    [stored] = answer.ReferencedSOPSequence
    assert stored.ReferencedSOPInstanceUID == film.SOPInstanceUID
    # Absolute, with the node's port although dicomweb-client's Host header names none.
    assert stored.RetrieveURL == (
        f"{_root(node)}/dicomweb/studies/{film.StudyInstanceUID}/series/"
        f"{film.SeriesInstanceUID}/instances/{film.SOPInstanceUID}"
    )
    assert "FailedSOPSequence" not in answer
    # Durable before the answer: its file is in the spool, with the client as its sender.
    spooled = (
        node.data_dir / "spool" / film.StudyInstanceUID / film.SeriesInstanceUID
        / f"{film.SOPInstanceUID}.dcm"
    )  # fmt: skip
    assert dcmread(spooled).file_meta.SourceApplicationEntityTitle == CLIENT
    wait_for(
        lambda: any(
            pacs.instance_tags(i).get("Modality") == "SR"
            for i in pacs.instances_of_study(film.StudyInstanceUID)
        ),
        PATIENCE_S,
        "the film's SR in the PACS",
        interval_s=0.3,
    )
    wait_for(
        lambda: [r["state"] for r in jobs_of(node, film.StudyInstanceUID)] == ["delivered"],
        PATIENCE_S,
        "the film's one job delivered",
        interval_s=0.3,
    )


def test_a_ct_study_in_one_request_and_in_chunks(node: Cadnode, tmp_path: Path) -> None:
    whole = write_ct_series(tmp_path / "whole", 300, size=32, seed=31)
    answer = client(node).store_instances([dcmread(p) for p in whole])
    assert len(answer.ReferencedSOPSequence) == 300
    study = dcmread(whole[0]).StudyInstanceUID
    assert answer.RetrieveURL.endswith(f"/dicomweb/studies/{study}")
    [row] = jobs_of(node, study)  # answered only once every row is committed
    assert row["instances"] == 300

    chunked = write_ct_series(tmp_path / "chunked", 300, size=32, seed=32)
    study = dcmread(chunked[0]).StudyInstanceUID
    for start in range(0, 300, 50):
        datasets = [dcmread(p) for p in chunked[start : start + 50]]
        answer = client(node).store_instances(datasets, study_instance_uid=study)
        assert len(answer.ReferencedSOPSequence) == 50
    [row] = jobs_of(node, study)
    assert row["instances"] == 300


def test_a_corrupt_part_fails_alone(node: Cadnode, tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", 3, size=32, seed=33)
    good = [p.read_bytes() for p in paths[:2]]
    corrupt = paths[2].read_bytes()
    corrupt = corrupt[: len(corrupt) - 700]  # Pixel Data cut short
    response = post(node, [good[0], corrupt, good[1]])
    assert response.status_code == 202, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    answer = response.json()
    stored, failed = uids_in(answer, "00081199"), uids_in(answer, "00081198")
    names = [dcmread(p).SOPInstanceUID for p in paths]
    assert set(stored) == set(names[:2])
    assert set(failed) == {names[2]}
    assert failed[names[2]]["00081197"]["Value"] == [0xC000]
    assert jobs_of(node, dcmread(paths[0]).StudyInstanceUID)[-1]["instances"] == 2


def test_a_part_of_another_study_fails(node: Cadnode, tmp_path: Path) -> None:
    [path] = write_ct_series(tmp_path / "ct", 1, size=32, seed=34)
    response = post(node, [path.read_bytes()], f"/dicomweb/studies/{generate_uid()}")
    assert response.status_code == 409, response.text
    [failed] = uids_in(response.json(), "00081198").values()
    assert failed["00081197"]["Value"] == [0xC409]
    assert jobs_of(node, dcmread(path).StudyInstanceUID) == []


def test_xml_on_request_and_406_for_what_it_cannot_answer(node: Cadnode, tmp_path: Path) -> None:
    [path] = write_ct_series(tmp_path / "ct", 1, size=32, seed=35)
    response = post(node, [path.read_bytes()], Accept="application/dicom+xml")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+xml")
    assert b'tag="00081199"' in response.content
    assert post(node, [path.read_bytes()], Accept="text/html").status_code == 406


def test_wrong_content_type_is_415(node: Cadnode) -> None:
    response = requests.post(
        f"{_root(node)}/dicomweb/studies",
        data=b"{}",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 415


def _answer_before_body(node: Cadnode, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST headers declaring a large body, send none of it, read the answer: it comes
    without the body ever being sent, so the node did not wait for (read) it."""
    lines = ["POST /dicomweb/studies HTTP/1.1", f"Host: 127.0.0.1:{node.http_port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer


def test_without_a_token_401_and_the_body_never_read(node: Cadnode) -> None:
    content_type = 'multipart/related; type="application/dicom"; boundary=x'
    headers = {"Content-Type": content_type, "Content-Length": str(8 * 2**20)}
    status, answer = _answer_before_body(node, headers)
    assert status == 401
    assert b"www-authenticate: bearer" in answer.lower()
    status, _ = _answer_before_body(node, {**headers, "Authorization": "Bearer wrong-token"})
    assert status == 401


def test_over_the_limit_413_unread(node: Cadnode) -> None:
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=x',
        "Content-Length": str((MAX_REQUEST_MB + 1) * 2**20),
    }
    status, _ = _answer_before_body(node, headers)
    assert status == 413


def test_a_cookie_without_a_token_never_stores(node: Cadnode) -> None:
    response = requests.post(
        f"{_root(node)}/dicomweb/studies",
        data=io.BytesIO(b""),
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'},
        cookies={"cadnode_session": "forged"},
        timeout=30,
    )
    assert response.status_code == 401


def test_mutual_tls_on_the_http_port(tmp_path: Path) -> None:
    """With `http.tls.client_ca`, a client without a certificate that CA signed gets no
    TLS session at all; one with it stores, with its token still required."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    tls = {"certificate": pki / "cadnode.crt", "private_key": pki / "cadnode.key"}
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "http": {"tls": {**tls, "client_ca": pki / "ca.crt"}},
        "dicomweb": {"clients": {CLIENT: hash_password(TOKEN)}},
    }
    (tmp_path / "cadnode.yaml").write_text(json.dumps(config, default=str))
    [path] = write_ct_series(tmp_path / "ct", 1, size=32, seed=36)
    body, content_type = multipart([path.read_bytes()])
    config_path = str(tmp_path / "cadnode.yaml")
    with run_cadnode(tmp_path / "node", None, CADNODE_CONFIG=config_path) as node:
        url = f"https://127.0.0.1:{node.http_port}/dicomweb/studies"
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}
        certified = {"verify": str(pki / "ca.crt"), "timeout": 30}
        wait_for(lambda: port_open(node.http_port), 30, "the node's HTTPS port")
        # TLS 1.3: the server refuses the missing certificate after the client's handshake
        # is done, so the client reads either its alert (SSLError) or a closed connection,
        # as the timing falls; both are ConnectionError, and neither carries a response.
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(url, data=body, headers=headers, **certified)
        mine = (str(pki / "modality.crt"), str(pki / "modality.key"))
        response = requests.post(url, data=body, headers=headers, cert=mine, **certified)
        assert response.status_code == 200, response.text
        del headers["Authorization"]
        anonymous = requests.post(url, data=body, headers=headers, cert=mine, **certified)
        assert anonymous.status_code == 401
