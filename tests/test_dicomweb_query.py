"""QIDO-RS and WADO-RS at /dicomweb: the query parameters as C-FIND identifiers (unit), and
a running node holding a chest film with its SR and SEG, asked by dicomweb-client and by
Orthanc's DICOMweb client (integration)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.uid import JPEG2000Lossless

from cadnode.serve.dicomweb.search import BadSearch, parse
from cadnode.serve.dicomweb.wado import _bits, accepted, instance_syntax
from cadnode.serve.query import SERIES, STUDY, STUDY_ROOT, checked
from tests.dicomweb_node import PATIENT_ID, TOKEN, dicomweb_root, node_holding_a_film
from tests.peers import Cadnode, Orthanc, free_port, run_orthanc, wait_for

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
VIEWER_ORIGIN = "http://127.0.0.1:9"


# -- unit: the query string as an identifier ---------------------------------------------


def parsed(query: list[tuple[str, str]], level: str = STUDY, **named: str) -> Any:
    return parse(query, level, dict(named), default_limit=100, max_limit=1000)


def test_keys_by_keyword_or_tag_become_the_identifiers_keys() -> None:
    search = parsed([("PatientName", "Web*"), ("00100020", "PID-1"), ("StudyDate", "20240101-")])
    identifier = search.identifier(STUDY, {})
    assert identifier.QueryRetrieveLevel == STUDY
    assert identifier.PatientName == "Web*"
    assert identifier.PatientID == "PID-1"
    assert identifier.StudyDate == "20240101-"
    # the study's default return keys ride along, empty (universal)
    assert identifier["StudyInstanceUID"].is_empty and "NumberOfStudyRelatedInstances" in identifier
    checked(identifier, STUDY_ROOT)  # a C-FIND identifier C-FIND itself accepts


def test_lists_includefield_and_page() -> None:
    search = parsed(
        [("ModalitiesInStudy", "CR,SEG"), ("includefield", "StudyDescription,00081030"),
         ("includefield", "00081060"), ("limit", "5"), ("offset", "10")]
    )  # fmt: skip
    identifier = search.identifier(STUDY, {})
    assert list(identifier.ModalitiesInStudy) == ["CR", "SEG"]
    assert "StudyDescription" in identifier and "NameOfPhysiciansReadingStudy" in identifier
    assert (search.limit, search.offset) == (5, 10)


def test_a_named_study_and_levels_above_reach_the_identifier() -> None:
    search = parsed([("Modality", "SEG")], SERIES, **{STUDY: "1.2.3"})
    identifier = search.identifier(SERIES, {STUDY: "1.2.3"})
    assert identifier.StudyInstanceUID == "1.2.3" and identifier.Modality == "SEG"
    assert checked(identifier, STUDY_ROOT).narrowing.study_uids == ["1.2.3"]
    # the study's own query in a relational walk carries no series key
    assert "Modality" not in search.identifier(STUDY, {})


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ([("NoSuchKeyword", "x")], "unknown"),
        ([("StudyDate", "yesterday")], "not a DA"),
        ([("limit", "-1")], "limit"),
        ([("offset", "ten")], "offset"),
        ([("includefield", "Nonsense")], "unknown"),
        ([("ReferencedSeriesSequence", "x")], "sequence"),
    ],
)
def test_bad_parameters_are_refused_saying_why(query: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(BadSearch, match=message):
        parsed(query)


def test_limits_fuzzymatching_and_unsupported_keys_warn() -> None:
    search = parsed([("limit", "5000"), ("fuzzymatching", "true"), ("SOPInstanceUID", "1.2")])
    assert search.limit == 1000
    assert any("fuzzymatching" in w for w in search.warnings)
    assert any("SOPInstanceUID" in w for w in search.warnings)
    assert search.keys == []  # an image's key is not matched at the study level


def test_accept_negotiation() -> None:
    default = accepted(None, "application/dicom")
    assert instance_syntax(JPEG2000Lossless, default) == EXPLICIT  # decompressed
    star = accepted('multipart/related; type="application/dicom"; transfer-syntax=*', "x")
    assert instance_syntax(JPEG2000Lossless, star) == JPEG2000Lossless
    j2k = accepted(
        f'multipart/related; type="application/dicom"; transfer-syntax={JPEG2000Lossless}', "x"
    )
    assert instance_syntax(EXPLICIT, j2k) is None  # compressing is not offered: 406


def test_one_bit_frames_start_on_a_byte() -> None:
    pixels = np.random.default_rng(1).integers(0, 2, size=(3, 5, 3), dtype=np.uint8)
    packed = np.packbits(pixels.ravel(), bitorder="little").tobytes()
    for n in range(3):
        expected = np.packbits(pixels[n].ravel(), bitorder="little").tobytes()
        assert _bits(packed, n * 15, 15) == expected


# -- integration: a node holding a film, its SR and SEG ----------------------------------


@dataclass
class Held:
    node: Cadnode
    pacs: Orthanc
    base: str
    film: Dataset
    client: DICOMwebClient

    def get(self, path: str, **headers: str) -> requests.Response:
        headers.setdefault("Authorization", f"Bearer {TOKEN}")
        return requests.get(self.base + path, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Held]:
    folder = tmp_path_factory.mktemp("dicomweb")
    http_port = free_port()  # Orthanc's configuration names the node's root
    base = dicomweb_root(http_port)
    orthanc_config = {
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {
                "cadnode": {"Url": base + "/", "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}
            },
        },
    }
    with (
        run_orthanc(folder / "orthanc", extra=orthanc_config) as pacs,
        node_holding_a_film(folder, pacs.destination, [VIEWER_ORIGIN], http_port) as held,
    ):
        yield Held(held.node, pacs, held.base, held.film, held.client)


def values(answer: dict[str, Any], tag: str) -> list[Any]:
    return list(answer.get(tag, {}).get("Value", []))


def test_search_studies_by_wildcard_date_range_and_includefield(held: Held) -> None:
    study = held.film.StudyInstanceUID
    found = held.client.search_for_studies(
        search_filters={"PatientName": "webviewer^w*", "StudyDate": f"{held.film.StudyDate}-"},
        fields=["StudyDescription", "00081060"],
    )
    assert [values(a, "0020000D") for a in found] == [[study]]
    [answer] = found
    assert "00081030" in answer and "00081060" in answer  # included, if empty
    assert sorted(values(answer, "00080061")) == sorted({held.film.Modality, "SR", "SEG"})
    assert values(answer, "00201208") == [5]  # the film and four results
    assert values(answer, "00081190") == [f"{held.base}/studies/{study}"]
    before = held.client.search_for_studies(search_filters={"StudyDate": "19000101-19000102"})
    assert before == []


def test_search_series_and_instances_across_studies(held: Held) -> None:
    [seg] = held.client.search_for_series(search_filters={"Modality": "SEG"})
    assert values(seg, "0020000D") == [held.film.StudyInstanceUID]  # the study's too
    assert values(seg, "00201209") == [1]
    srs = held.client.search_for_instances(search_filters={"Modality": "SR"})
    assert len(srs) == 3  # rule-out, segmenter, findings
    film = held.client.search_for_instances(
        held.film.StudyInstanceUID, held.film.SeriesInstanceUID, fields=["all"]
    )
    assert [values(a, "00080018") for a in film] == [[held.film.SOPInstanceUID]]
    assert values(film[0], "00280010") == [held.film.Rows]


def test_limit_and_offset_page_through(held: Held) -> None:
    study = held.film.StudyInstanceUID
    first = held.get(f"/studies/{study}/instances?limit=3")
    assert "additional results" in first.headers.get("Warning", "")
    rest = held.client.search_for_instances(study, offset=3, limit=3)
    uids = [values(a, "00080018")[0] for a in [*first.json(), *rest]]
    assert len(uids) == len(set(uids)) == 5


def test_a_bad_parameter_is_a_400_and_no_token_a_401(held: Held) -> None:
    bad = held.get("/studies?StudyDate=last-week")
    assert bad.status_code == 400 and "StudyDate" in bad.json()["detail"]
    assert held.get("/studies?Bogus=1").status_code == 400
    assert requests.get(held.base + "/studies", timeout=10).status_code == 401


def test_retrieve_study_series_and_instance(held: Held) -> None:
    film = held.film
    study = held.client.retrieve_study(film.StudyInstanceUID)
    assert {ds.Modality for ds in study} == {film.Modality, "SR", "SEG"} and len(study) == 5
    series = held.client.retrieve_series(film.StudyInstanceUID, film.SeriesInstanceUID)
    assert [ds.SOPInstanceUID for ds in series] == [film.SOPInstanceUID]
    instance = held.client.retrieve_instance(
        film.StudyInstanceUID, film.SeriesInstanceUID, film.SOPInstanceUID
    )
    assert instance.PixelData == film.PixelData
    audit = held.node.cli("audit", "--kind", "retrieved")
    events = [json.loads(line) for line in audit.stdout.splitlines()]
    assert any(e["actor"] == "ADMIN" and "WADO-RS" in e["details"]["destination"] for e in events)


def test_transfer_syntax_is_negotiated_by_accept(held: Held) -> None:
    film = held.film
    path = "/".join(
        ("/studies", film.StudyInstanceUID, "series", film.SeriesInstanceUID, "instances",
         film.SOPInstanceUID)
    )  # fmt: skip
    dicom = 'multipart/related; type="application/dicom"'
    for syntax, expected in (
        (EXPLICIT, EXPLICIT),
        (IMPLICIT, IMPLICIT),
        ("*", str(film.file_meta.TransferSyntaxUID)),
    ):
        answer = held.get(path, Accept=f"{dicom}; transfer-syntax={syntax}")
        assert answer.status_code == 200
        assert f"transfer-syntax={expected}" in answer.text[:400]
    refused = held.get(path, Accept=f"{dicom}; transfer-syntax={JPEG2000Lossless}")
    assert refused.status_code == 406


def test_metadata_and_frames_of_the_film_and_the_seg(held: Held) -> None:
    film = held.film
    [meta] = held.client.retrieve_series_metadata(film.StudyInstanceUID, film.SeriesInstanceUID)
    assert values(meta, "00100020") == [PATIENT_ID]
    assert "BulkDataURI" in meta["7FE00010"] and "InlineBinary" not in meta["7FE00010"]
    [frame] = held.client.retrieve_instance_frames(
        film.StudyInstanceUID, film.SeriesInstanceUID, film.SOPInstanceUID, [1]
    )
    assert frame == film.PixelData
    [seg] = [ds for ds in held.client.retrieve_study(film.StudyInstanceUID) if ds.Modality == "SEG"]
    numbers = list(range(1, int(seg.NumberOfFrames) + 1))
    frames = held.client.retrieve_instance_frames(
        seg.StudyInstanceUID, seg.SeriesInstanceUID, seg.SOPInstanceUID, numbers
    )
    pixels = seg.pixel_array.reshape(len(numbers), seg.Rows, seg.Columns)
    for number, got in zip(numbers, frames, strict=True):
        expected = pixels[number - 1].astype(np.uint8)
        if seg.BitsAllocated == 1:
            assert got == np.packbits(expected.ravel(), bitorder="little").tobytes()
        else:
            assert got == expected.tobytes()
    seg_meta = held.client.retrieve_instance_metadata(
        seg.StudyInstanceUID, seg.SeriesInstanceUID, seg.SOPInstanceUID
    )
    bulk = held.client.retrieve_bulkdata(seg_meta["7FE00010"]["BulkDataURI"])
    assert bulk == [seg.PixelData]
    assert (
        held.get(
            f"/studies/{seg.StudyInstanceUID}/series/{seg.SeriesInstanceUID}/instances/{seg.SOPInstanceUID}/frames/999"
        ).status_code
        == 404
    )


def test_cors_for_the_configured_origin_only(held: Held) -> None:
    preflight = requests.options(
        held.base + "/studies",
        headers={"Origin": VIEWER_ORIGIN, "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"},
        timeout=10,
    )  # fmt: skip
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == VIEWER_ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = held.get("/studies", Origin=VIEWER_ORIGIN)
    assert answer.headers["access-control-allow-origin"] == VIEWER_ORIGIN
    assert "warning" in answer.headers["access-control-expose-headers"].lower()
    other = held.get("/studies", Origin="http://elsewhere.example")
    assert "access-control-allow-origin" not in other.headers


def test_orthanc_queries_and_retrieves_through_its_dicomweb_client(held: Held) -> None:
    study = held.film.StudyInstanceUID
    found = held.pacs.post(
        "/dicom-web/servers/cadnode/qido",
        json.dumps({"Uri": "/studies", "Arguments": {"PatientID": PATIENT_ID}}).encode(),
    )
    assert len(found) == 1 and study in json.dumps(found)  # Orthanc simplifies DICOM JSON
    held.pacs.post(
        "/dicom-web/servers/cadnode/retrieve",
        json.dumps({"Resources": [{"Study": study}]}).encode(),
    )

    def in_orthanc() -> set[str]:
        tags = (held.pacs.instance_tags(i) for i in held.pacs.instances_of_study(study))
        return {str(t.get("SOPInstanceUID")) for t in tags}

    wait_for(lambda: held.film.SOPInstanceUID in in_orthanc(), 60, "the film in Orthanc")
