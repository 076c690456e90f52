"""Every valid Specific Character Set yields results that keep what they copy.

Chest films carry the person names of PS3.5 Annex H (Japanese), I (Korean) and J (Chinese)
in the examples' own bytes and character sets, as the pydicom charset files hold them
(the `\\ISO 2022 IR 58` one, which pydicom does not ship, is written out from J.3), plus
Latin-1 and a lone `ISO 2022 IR 6`. From each, the SR, SEG and Secondary Capture must pass
dciodvfy, be declared ISO_IR 192 and hold the name, all three component groups, as the
standard spells it; so must the UPS workitem, the HL7 order update and the webhook.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.charset import convert_encodings
from pydicom.data import get_charset_files
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from cadnode.core.config import Hl7Codes, Hl7Publisher, UpsTurnaround
from cadnode.core.db import Instance, Priority, Workitem
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.encode.charset import utf8_header
from cadnode.encode.provenance import CodedLabel
from cadnode.encode.sc import secondary_capture
from cadnode.encode.seg import segmentation
from cadnode.encode.sr import (
    Classification,
    ReportIdentity,
    Segmented,
    classification_report,
    segmentation_report,
)
from cadnode.prioritize.hl7 import order_update
from cadnode.prioritize.notice import Notice
from cadnode.prioritize.webhook import document
from cadnode.prioritize.worklist import build_workitem, dataset_of, workitem_uid
from tests.dicom_validation import assert_valid, saved
from tests.encode_cases import SEGMENTER, film_with_masks, segment_findings

WHEN = dt.datetime(2026, 1, 2, 9, 30, 0)
# The segmenter's SR codes the percent of the hemithorax in cadnode's private scheme.
PRIVATE_SCHEME_WARNING = "Unrecognized defined term <99CADNODE>"
ACCESSION = "ACC-CHARSET-1"

TURNAROUND = UpsTurnaround()


@dataclass(frozen=True)
class Example:
    """A character set and a person name in it: the bytes on the wire, and their meaning."""

    id: str
    character_set: str | list[str]
    encoded: bytes
    name: str  # alphabetic=ideographic=phonetic, as the standard spells it

    @property
    def groups(self) -> list[str]:
        return [*self.name.split("="), "", ""][:3]


def _from_pydicom(file: str) -> bytes:
    """The Patient's Name bytes of one of pydicom's charset files (the PS3.5 examples)."""
    [path] = get_charset_files(file)
    value = pydicom.dcmread(path).get_item("PatientName").value
    assert isinstance(value, bytes)
    return value


EXAMPLES = [
    Example(
        "annex-h-ir87",
        ["", "ISO 2022 IR 87"],
        _from_pydicom("chrH31.dcm"),
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
    ),
    Example(
        "annex-h-ir13-ir87",
        ["ISO 2022 IR 13", "ISO 2022 IR 87"],
        _from_pydicom("chrH32.dcm"),
        "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
    ),
    Example(
        "annex-i-ir149",
        ["", "ISO 2022 IR 149"],
        _from_pydicom("chrI2.dcm"),
        "Hong^Gildong=洪^吉洞=홍^길동",
    ),
    Example("annex-j-utf8", "ISO_IR 192", _from_pydicom("chrX1.dcm"), "Wang^XiaoDong=王^小東="),
    Example("annex-j-gb18030", "GB18030", _from_pydicom("chrX2.dcm"), "Wang^XiaoDong=王^小东="),
    Example(  # PS3.5 J.3: GB 2312 designated to G1 (ESC $ ) A) before each ideographic part
        "annex-j-ir58",
        ["", "ISO 2022 IR 58"],
        b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab= ",
        "Zhang^XiaoDong=张^小东=",
    ),
    Example("latin-1", "ISO_IR 100", _from_pydicom("chrFren.dcm"), "Buc^Jérôme"),
    Example("ir6-alone", "ISO 2022 IR 6", b"Doe^Jane", "Doe^Jane"),
]
BY_ID = {example.id: example for example in EXAMPLES}


def _raw(keyword: str, vr: str, value: bytes) -> RawDataElement:
    """An element as read from a file: its bytes, decoded only when read."""
    value += b" " * (len(value) % 2)  # even length, padded as PS3.5 pads text
    return RawDataElement(Tag(keyword), vr, len(value), value, 0, False, True)


def carry(ds: pydicom.Dataset, example: Example) -> pydicom.Dataset:
    """`ds` declaring the example's character set, with its name, in its bytes, as patient,
    referring physician and study description (LO: the same bytes are a valid LO)."""
    ds.SpecificCharacterSet = example.character_set
    # As if read in this character set: pydicom writes raw elements as they are only then,
    # instead of decoding and re-encoding them (which, for IR 58, it gets wrong).
    ds.set_original_encoding(False, True, convert_encodings(example.character_set))
    for keyword, vr in (
        ("PatientName", "PN"),
        ("ReferringPhysicianName", "PN"),
        ("StudyDescription", "LO"),
    ):
        ds[keyword] = _raw(keyword, vr, example.encoded)
    return ds


def film_in(folder: Path, example: Example) -> tuple[pydicom.Dataset, np.ndarray]:
    """A pneumothorax film as received (written, read back) in the example's encoding."""
    film, masks = film_with_masks(folder, pneumothorax=True)
    path = folder / f"film-{example.id}.dcm"
    carry(film, example).save_as(path, enforce_file_format=True)
    received = pydicom.dcmread(path)
    assert received.get_item("PatientName").value.rstrip(b" ") == example.encoded.rstrip(b" ")
    return received, masks


def uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["test-encode-charsets", *parts])


def assert_kept(ds: pydicom.Dataset, example: Example, *, description: bool = True) -> None:
    """Declared UTF-8, with the name's three component groups and the description intact."""
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    for keyword in ("PatientName", "ReferringPhysicianName"):
        name = ds[keyword].value
        assert [name.alphabetic, name.ideographic, name.phonetic] == example.groups, keyword
    if description:
        assert ds.StudyDescription == example.name


def written(ds: pydicom.Dataset, path: Path, warning: str | None = None) -> pydicom.Dataset:
    """`ds` as a reader gets it: written, checked by dciodvfy, read back."""
    return pydicom.dcmread(assert_valid(saved(ds, path), warning))


# --- the one helper every result copies through -----------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_the_header_is_decoded_and_declared_utf8(tmp_path: Path, example: Example) -> None:
    film, _ = film_in(tmp_path, example)
    header = utf8_header(film)
    assert "PixelData" not in header and "PixelData" in film
    assert_kept(header, example)
    header.save_as(tmp_path / "header.dcm", implicit_vr=False, little_endian=True)
    assert_kept(pydicom.dcmread(tmp_path / "header.dcm", force=True), example)


@pytest.mark.parametrize("file", ["chrSQEncoding.dcm", "chrSQEncoding1.dcm"])
def test_a_sequence_item_in_its_own_character_set_is_decoded_with_it(file: str) -> None:
    """A Japanese name in an item that declares (or inherits) ISO 2022 IR 13\\IR 87, under a
    UTF-8 (or Japanese) dataset: the copy's items declare nothing, the whole copy is UTF-8."""
    [path] = get_charset_files(file)
    header = utf8_header(pydicom.dcmread(path))
    [item] = header.RequestedProcedureCodeSequence
    assert "SpecificCharacterSet" not in item
    assert str(item.PatientName) == BY_ID["annex-h-ir13-ir87"].name
    assert header.RequestingPhysician == "Doctor^Who^^MD"
    assert header.SpecificCharacterSet == "ISO_IR 192"


# --- SR, SEG, Secondary Capture -----------------------------------------------------------


def _classification_sr(film: pydicom.Dataset, masks: np.ndarray) -> pydicom.Dataset:
    item = Classification(
        source=film,
        label=CodedLabel(value="263654008", scheme="SCT", meaning="Abnormal"),
        probability=0.9,
        operating_point="rule_out",
        threshold=0.5,
        ruled_out=False,
    )
    return classification_report(
        [item], SEGMENTER, ReportIdentity(uid("c-series"), uid("c-sr"), content_datetime=WHEN)
    )


def _seg(film: pydicom.Dataset, masks: np.ndarray) -> pydicom.Dataset:
    return segmentation(
        film,
        masks,
        segment_findings(film, masks),
        SEGMENTER,
        series_instance_uid=uid("seg-series"),
        sop_instance_uid=uid("seg", film.SOPInstanceUID),
        content_datetime=WHEN,
    )


def _segmentation_sr(film: pydicom.Dataset, masks: np.ndarray) -> pydicom.Dataset:
    seg = _seg(film, masks)
    return segmentation_report(
        [Segmented(film, segment_findings(film, masks), seg)],
        SEGMENTER,
        ReportIdentity(uid("s-series"), uid("s-sr"), content_datetime=WHEN),
    )


def _capture(film: pydicom.Dataset, masks: np.ndarray) -> pydicom.Dataset:
    return secondary_capture(
        film,
        SEGMENTER,
        series_instance_uid=uid("sc-series"),
        sop_instance_uid=uid("sc", film.SOPInstanceUID),
        masks=masks[0],
        summary="pneumothorax",
        content_datetime=WHEN,
        limit=DEFAULT_LIMIT,
    )


Builder = Callable[[pydicom.Dataset, np.ndarray], pydicom.Dataset]
BUILDERS: dict[str, tuple[Builder, str | None]] = {
    "classification-sr": (_classification_sr, None),
    "seg": (_seg, None),
    "segmentation-sr": (_segmentation_sr, PRIVATE_SCHEME_WARNING),
    "secondary-capture": (_capture, None),
}
# highdicom's Secondary Capture copies the patient and a few study attributes; Study
# Description (type 3) is not among them.
WITHOUT_DESCRIPTION = {"secondary-capture"}


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_every_result_is_valid_utf8_and_keeps_the_name(
    tmp_path: Path, example: Example, kind: str
) -> None:
    film, masks = film_in(tmp_path, example)
    build, warning = BUILDERS[kind]
    result = written(build(film, masks), tmp_path / f"{kind}.dcm", warning)
    assert_kept(result, example, description=kind not in WITHOUT_DESCRIPTION)
    assert result.PatientID == film.PatientID


# --- worklist: UPS workitem, HL7, webhook -------------------------------------------------


def _workitem(film: pydicom.Dataset) -> pydicom.Dataset:
    """The workitem as the prioritize stage makes it (from `utf8_header` of the image) and
    keeps it (DICOM JSON in the database)."""
    instance = Instance(
        sop_instance_uid=film.SOPInstanceUID,
        sop_class_uid=film.SOPClassUID,
        series_uid=film.SeriesInstanceUID,
        transfer_syntax="1.2.840.10008.1.2.1",
        path="film.dcm",
        size=1,
        calling_ae="MODALITY",
        peer="127.0.0.1:1",
        job_id=1,
    )
    ds = build_workitem(
        workitem_uid(film.StudyInstanceUID),
        utf8_header(film),
        [instance],
        priority=Priority.HIGH,
        reason="pneumothorax",
        worklist_label="CADNODE",
        turnaround=TURNAROUND,
        retrieve_ae="CADNODE",
        ready=True,
    )
    kept = Workitem(
        sop_instance_uid=ds.SOPInstanceUID,
        study_id=1,
        priority=Priority.HIGH,
        dataset=ds.to_json_dict(),
    )
    return dataset_of(kept)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_the_workitem_keeps_the_name_and_the_description(tmp_path: Path, example: Example) -> None:
    film, _ = film_in(tmp_path, example)
    film.AccessionNumber = ACCESSION
    ds = _workitem(film)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    name = ds.PatientName
    assert [name.alphabetic, name.ideographic, name.phonetic] == example.groups
    assert ds.ReferencedRequestSequence[0].RequestedProcedureDescription == example.name
    # As pushed to a UPS SCP:
    ds.save_as(tmp_path / "ups.dcm", implicit_vr=False, little_endian=True)
    assert str(pydicom.dcmread(tmp_path / "ups.dcm", force=True).PatientName) == str(name)


def _notice(workitem: pydicom.Dataset) -> Notice:
    return Notice(
        publication_id=7,
        study_uid=workitem.StudyInstanceUID,
        workitem=workitem,
        level=Priority.HIGH,
        previous=Priority.MEDIUM,
        reason="pneumothorax",
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_the_hl7_order_names_the_patient_in_every_component_group(
    tmp_path: Path, example: Example
) -> None:
    """OMI (strictly valid): PID-5 repeats per component group, XPN-8 says which (A, I, P);
    MSH-18 declares UTF-8 when the message is not ASCII."""
    film, _ = film_in(tmp_path, example)
    notice = _notice(_workitem(film))
    publisher = Hl7Publisher(host="ris", port=2575, codes=Hl7Codes(HIGH="A"))
    text = order_update(notice, publisher, "CADNODE7").to_er7()
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    names = message.omi_o23_patient.pid.pid_5
    groups = [(code, group) for code, group in zip("AIP", example.groups, strict=True) if group]
    assert [(n.xpn_8.to_er7() or "A", _joined(n)) for n in names] == groups
    assert message.msh.msh_18.to_er7() == ("" if text.isascii() else "UNICODE UTF-8")
    assert document(notice)["accession_number"] == notice.accession_number


def _joined(xpn: object) -> str:
    """XPN family^given back in DICOM's order (the examples have no more components)."""
    return "^".join(getattr(xpn, component).to_er7() for component in ("xpn_1", "xpn_2"))


def test_the_orm_order_declares_utf8_too(tmp_path: Path) -> None:
    film, _ = film_in(tmp_path, BY_ID["annex-h-ir87"])
    publisher = Hl7Publisher(host="ris", port=2575, message="ORM^O01")
    text = order_update(_notice(_workitem(film)), publisher, "CADNODE7").to_er7()
    [msh] = [line for line in text.split("\r") if line.startswith("MSH")]
    assert msh.split("|")[17] == "UNICODE UTF-8"
    assert "PID|||" in text and "Yamada^Tarou^^^^^^A~山田^太郎^^^^^^I~やまだ^たろう^^^^^^P" in text
