"""A final report as HL7 v2 ORU^R01: what it says, and the ACK that answers it.

Parsed with hl7apy (segments read flat, validation tolerant: RIS messages vary), answered
with an hl7apy ACK in the sender's version (2.5.1 where hl7apy lacks it): MSA-1 AA when
the report was taken, AE (application error) when it names no study this node holds, AR
(rejected) when it is not an ORU^R01 one can read, comes from a facility not allowed, or
is too big; MSA-3 says why.

Which study: the accession number in OBR-3 (filler order number, as IHE has it), else
ORC-3, else OBR-18 (placer field 1, where cadnode's own ORM^O01 puts it); the Study
Instance UID in ZDS-1 (IHE SWF) or in an OBX whose identifier is DICOM's 113014 ("Study
Instance UID"), preferred when present. The report's words: OBX-5 of every TX, FT or ST
observation, every repetition, unescaped.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message

from cadnode.core.hl7v2 import UTF8, set_value

TEXT_TYPES = ("TX", "FT", "ST")
STUDY_UID_CODE = "113014"  # DCM "Study Instance UID"
# Result status (OBR-25, HL7 table 0123): final or corrected; others are not the conclusion.
FINAL = ("F", "C", "")
DEFAULT_VERSION = "2.5.1"
_ESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\", ".br": "\n"}
_ESCAPE = re.compile(r"\\([^\\]{1,32})\\")


class AckCode(StrEnum):
    AA = "AA"  # accepted
    AE = "AE"  # application error: the message is sound, its content not usable
    AR = "AR"  # rejected: not a message this listener takes


class Refused(Exception):
    """The report is not taken: the ACK's code and the reason it gives."""

    def __init__(self, code: AckCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """What an ACK needs from the message it answers (read even from one unparsable)."""

    control_id: str = ""
    version: str = DEFAULT_VERSION
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"

    @property
    def author(self) -> str:
        """Who sent it, for the feedback's author: application@facility."""
        facility = f"@{self.sending_facility}" if self.sending_facility else ""
        return (self.sending_application or "HL7") + facility


@dataclass(frozen=True)
class Report:
    header: Header
    accession: str
    study_uid: str
    status: str  # OBR-25
    text: str


def header_of(text: str) -> Header:
    """The MSH fields an ACK echoes, split by hand: even a message hl7apy refuses gets one."""
    first = text.replace("\n", "\r").split("\r", 1)[0]
    if not first.startswith("MSH") or len(first) < 8:
        return Header()
    fields = first.split(first[3])
    component = first[4]

    def at(index: int) -> str:  # MSH-n is fields[n - 1]: the separator itself is MSH-1
        value = fields[index - 1] if index - 1 < len(fields) else ""
        return value.split(component, 1)[0][:64]

    version = at(12) or DEFAULT_VERSION
    return Header(at(10), version, at(3), at(4), at(5), at(6), at(11) or "P")


def read_report(text: str) -> Report:
    """The report in an ORU^R01; Refused(AR) if the text is not one."""
    header = header_of(text)
    try:
        message = parse_message(
            text.replace("\n", "\r").strip("\r"),
            find_groups=False,
            validation_level=VALIDATION_LEVEL.TOLERANT,
        )
        kind = (message.msh.msh_9.msg_1.to_er7(), message.msh.msh_9.msg_2.to_er7())
    except Exception as error:
        raise Refused(
            AckCode.AR, f"not a readable HL7 v2 message ({type(error).__name__})"
        ) from error
    if kind != ("ORU", "R01"):
        raise Refused(AckCode.AR, f"only ORU^R01 is taken here, not {'^'.join(kind)}")
    segments = {name: _segments(message, name) for name in ("OBR", "ORC", "OBX", "ZDS")}
    return Report(
        header=header,
        accession=_accession(segments),
        study_uid=_study_uid(segments),
        status=_first(segments["OBR"], "OBR_25"),
        text="\n".join(_observation_texts(segments["OBX"])),
    )


def _segments(message: Message, name: str) -> list[Any]:
    return [child for child in message.children if child.name == name]


def _first(segments: list[Any], field: str, component: str | None = None) -> str:
    """The first non-empty value of `field` (its `component`) among `segments`."""
    for segment in segments:
        for repetition in _fields(segment, field):
            value = _component(repetition, component)
            if value:
                return value
    return ""


def _fields(segment: Any, field: str) -> list[Any]:
    return [child for child in segment.children if child.name == field]


def _component(field: Any, component: str | None) -> str:
    if component is None:
        return unescape(field.to_er7().split("^", 1)[0])
    parts = [child for child in field.children if child.name == component]
    return unescape(parts[0].to_er7()) if parts else ""


def _accession(segments: dict[str, list[Any]]) -> str:
    return (
        _first(segments["OBR"], "OBR_3")
        or _first(segments["ORC"], "ORC_3")
        or _first(segments["OBR"], "OBR_18")
    ).strip()


def _study_uid(segments: dict[str, list[Any]]) -> str:
    for obx in segments["OBX"]:
        if _first([obx], "OBX_3") == STUDY_UID_CODE:
            return _first([obx], "OBX_5").strip()
    return _first(segments["ZDS"], "ZDS_1").strip()


def _observation_texts(observations: list[Any]) -> list[str]:
    texts = []
    for obx in observations:
        if _first([obx], "OBX_2") in TEXT_TYPES:
            texts += [unescape(value.to_er7()) for value in _fields(obx, "OBX_5")]
    return texts


def unescape(value: str) -> str:
    """HL7's escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\, FT's \\.br\\) back to text;
    formatting ones (\\H\\, \\N\\, \\.sp\\ ...) and hex (\\X..\\) dropped."""
    return _ESCAPE.sub(lambda match: _ESCAPES.get(match[1], " "), value)


def acknowledgement(header: Header, code: AckCode, reason: str) -> str:
    """The ACK to `header`'s message, as ER7 (segments ending in CR)."""
    version = header.version if _known_version(header.version) else DEFAULT_VERSION
    ack = Message("ACK", version=version, validation_level=VALIDATION_LEVEL.TOLERANT)
    msh = ack.msh
    set_value(msh.msh_3.hd_1, header.receiving_application or "CADNODE", version)
    set_value(msh.msh_4.hd_1, header.receiving_facility, version)
    set_value(msh.msh_5.hd_1, header.sending_application, version)
    set_value(msh.msh_6.hd_1, header.sending_facility, version)
    msh.msh_7 = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    msh.msh_9 = "ACK^R01^ACK"
    set_value(msh.msh_10, f"CADNODE{dt.datetime.now().strftime('%H%M%S%f')}", version)
    msh.msh_11 = header.processing_id if header.processing_id in ("P", "T", "D") else "P"
    ack.msa.msa_1 = code.value
    set_value(ack.msa.msa_2, header.control_id, version)
    set_value(ack.msa.msa_3, reason[:80], version)
    if not ack.to_er7().isascii():
        msh.msh_18 = UTF8
    return str(ack.to_er7()) + "\r"


def _known_version(version: str) -> bool:
    try:
        Message("ACK", version=version, validation_level=VALIDATION_LEVEL.TOLERANT)
    except Exception:
        return False
    return True
