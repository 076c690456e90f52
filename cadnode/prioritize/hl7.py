"""HL7 v2 order updates over MLLP: tell the RIS a study's new reading priority.

Built and parsed with hl7apy (every value set as a typed HL7 element, so delimiters in names
and descriptions are escaped), in one of two shapes:

- OMI^O23 (v2.5.1, IHE SWF.b): priority in TQ1-9 and OBR-5; IPC carries the accession
  number, requested procedure ID and Study Instance UID.
- ORM^O01 (v2.3.1, IHE SWF): priority in ORC-7 (component 6) and OBR-5; the accession number
  in ORC-3, OBR-3 and OBR-18, the Study Instance UID in ZDS-1.

The message is sent framed by MLLP; it counts as delivered only once the RIS answers with
an ACK whose MSA-1 is AA (or CA) for this message's control ID.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
from collections.abc import Iterator, Mapping

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Field, Message
from hl7apy.parser import parse_message
from pydicom import Dataset

from cadnode.core.config import Hl7Publisher
from cadnode.core.db import PublicationChannel
from cadnode.core.hl7v2 import END, START, UTF8, set_value
from cadnode.prioritize.notice import Link, Notice, PublishError

ACCEPTED = ("AA", "CA")
# DICOM Patient's Sex -> HL7 table 0001.
SEX = {"M": "M", "F": "F", "O": "O"}
# HL7 table 4000 (name representation) for a DICOM name's component groups, in their order.
_REPRESENTATIONS = ("A", "I", "P")


class Hl7Channel:
    name = PublicationChannel.hl7

    def __init__(self, publishers: Mapping[str, Hl7Publisher]) -> None:
        self.publishers = publishers

    @contextlib.contextmanager
    def connect(self, destination: str) -> Iterator[Link]:
        publisher = self.publishers.get(destination)
        if publisher is None:
            raise PublishError(f"HL7 publisher {destination!r} is no longer configured")
        yield Hl7Link(publisher)


class Hl7Link:
    """One MLLP connection per message: many RIS listeners close after each ACK."""

    def __init__(self, publisher: Hl7Publisher) -> None:
        self.publisher = publisher

    def send(self, notice: Notice) -> None:
        control_id = f"CADNODE{notice.publication_id}"
        message = order_update(notice, self.publisher, control_id)
        answer = exchange(
            self.publisher.host, self.publisher.port, message.to_er7(), self.publisher.timeout_s
        )
        check_ack(answer, control_id)


def order_update(notice: Notice, publisher: Hl7Publisher, control_id: str) -> Message:
    if notice.level is None:
        raise ValueError("an HL7 order update needs a priority decision")
    code = getattr(publisher.codes, notice.level.value)
    if publisher.message == "OMI^O23":
        message = _omi(notice, publisher, control_id, code)
    else:
        message = _orm(notice, publisher, control_id, code)
    if not message.to_er7().isascii():
        # `exchange` sends UTF-8; without MSH-18 a RIS reads the message as ASCII.
        message.msh.msh_18 = UTF8
    return message


def _omi(notice: Notice, publisher: Hl7Publisher, control_id: str, code: str) -> Message:
    version = "2.5.1"
    message = _message("OMI_O23", "OMI^O23^OMI_O23", version, publisher, control_id)
    _patient(message.add_group("OMI_O23_PATIENT"), notice.workitem, version)
    order = message.add_group("OMI_O23_ORDER")
    accession, request = _request(notice.workitem)
    order.orc.orc_1 = "XO"  # change order
    set_value(order.orc.orc_3.ei_1, accession, version)
    set_value(order.add_group("OMI_O23_TIMING").tq1.tq1_9.cwe_1, code, version)
    _observation_request(order.obr, notice, request, code, version)
    _note(order.add_segment("NTE"), notice, version)
    ipc = order.add_segment("IPC")
    set_value(ipc.ipc_1.ei_1, accession, version)
    set_value(ipc.ipc_2.ei_1, str(request.get("RequestedProcedureID", "")) or accession, version)
    set_value(ipc.ipc_3.ei_1, notice.study_uid, version)
    set_value(ipc.ipc_4.ei_1, accession, version)  # the Scheduled Procedure Step ID is not kept
    message.validate()  # hl7apy checks the OMI_O23 structure and required fields
    return message


def _orm(notice: Notice, publisher: Hl7Publisher, control_id: str, code: str) -> Message:
    version = "2.3.1"
    # TOLERANT: hl7apy 1.3 serializes a Z segment only then, and its validator treats every
    # branch of ORM's CHOICE group as required. Values are still typed, hence escaped.
    message = _message("ORM_O01", "ORM^O01", version, publisher, control_id, strict=False)
    _patient(message.add_group("ORM_O01_PATIENT"), notice.workitem, version)
    order = message.add_group("ORM_O01_ORDER")
    accession, request = _request(notice.workitem)
    order.orc.orc_1 = "XO"
    set_value(order.orc.orc_3.ei_1, accession, version)
    set_value(order.orc.orc_7.tq_6, code, version)  # Quantity/Timing: priority
    detail = order.add_group("ORM_O01_ORDER_DETAIL")
    obr = detail.add_group("ORM_O01_CHOICE").obr
    _observation_request(obr, notice, request, code, version)
    set_value(obr.obr_18, accession, version)  # IHE SWF: Placer Field 1 = accession number
    set_value(obr.obr_19, str(request.get("RequestedProcedureID", "")), version)
    _note(detail.add_segment("NTE"), notice, version)
    zds = message.add_segment("ZDS")  # IHE SWF: after the order
    study = Field(
        "ZDS_1", datatype="RP", version=version, validation_level=message.validation_level
    )
    set_value(study.rp_1, notice.study_uid, version)  # IHE: <Study UID>^100^Application^DICOM
    set_value(study.rp_2.hd_1, "100", version)
    set_value(study.rp_3, "Application", version)
    set_value(study.rp_4, "DICOM", version)
    zds.add(study)
    return message


def _message(
    structure: str,
    kind: str,
    version: str,
    publisher: Hl7Publisher,
    control_id: str,
    strict: bool = True,
) -> Message:
    level = VALIDATION_LEVEL.STRICT if strict else VALIDATION_LEVEL.TOLERANT
    message = Message(structure, version=version, validation_level=level)
    msh = message.msh
    set_value(msh.msh_3.hd_1, publisher.sending_application, version)
    set_value(msh.msh_4.hd_1, publisher.sending_facility, version)
    set_value(msh.msh_5.hd_1, publisher.receiving_application, version)
    set_value(msh.msh_6.hd_1, publisher.receiving_facility, version)
    msh.msh_7 = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    msh.msh_9 = kind
    set_value(msh.msh_10, control_id, version)
    msh.msh_11 = "P"
    return message


def _patient(group: object, workitem: Dataset, version: str) -> None:
    pid = group.pid  # type: ignore[attr-defined]
    set_value(pid.pid_3.cx_1, str(workitem.get("PatientID", "")), version)
    _name(pid, str(workitem.get("PatientName", "")), version)
    birth = str(workitem.get("PatientBirthDate", ""))
    if birth:
        pid.pid_7 = birth
    sex = SEX.get(str(workitem.get("PatientSex", "")))
    if sex:
        pid.pid_8 = sex


def _name(pid: object, name: str, version: str) -> None:
    """PID-5, one repetition per component group of the DICOM name (alphabetic, ideographic,
    phonetic: PS3.5 6.2.1.2), each with its representation code (XPN-8, HL7 table 4000),
    which a lone alphabetic group, the usual case, goes without."""
    # A name has at most three groups (more is malformed): `strict=False` drops the rest.
    named = zip(_REPRESENTATIONS, name.split("="), strict=False)
    groups = [(code, group) for code, group in named if group]
    coded = [code for code, _ in groups] != ["A"]
    for index, (code, group) in enumerate(groups):
        xpn = pid.pid_5 if index == 0 else pid.add_field("PID_5")  # type: ignore[attr-defined]
        parts = group.split("^")
        set_value(xpn.xpn_1.fn_1, parts[0], version)  # DICOM PN and HL7 XPN share the order,
        # but for prefix and suffix: family^given^middle^prefix^suffix vs ...^suffix^prefix.
        for component, part in zip(("xpn_2", "xpn_3", "xpn_5", "xpn_4"), parts[1:], strict=False):
            set_value(getattr(xpn, component), part, version)
        if coded:
            set_value(xpn.xpn_8, code, version)


def _request(workitem: Dataset) -> tuple[str, Dataset]:
    request = (workitem.get("ReferencedRequestSequence") or [Dataset()])[0]
    return str(request.get("AccessionNumber", "")), request


def _observation_request(
    obr: object, notice: Notice, request: Dataset, code: str, version: str
) -> None:
    accession = str(request.get("AccessionNumber", ""))
    described = str(request.get("RequestedProcedureDescription", "")) or "Imaging study"
    set_value(obr.obr_3.ei_1, accession, version)  # type: ignore[attr-defined]
    set_value(obr.obr_4.ce_2, described, version)  # type: ignore[attr-defined]
    obr.obr_5 = code  # type: ignore[attr-defined]


def _note(nte: object, notice: Notice, version: str) -> None:
    """The priority and its reason as a comment, for the people reading the order."""
    level = notice.level.value if notice.level else ""
    set_value(nte.nte_3, f"cadnode priority {level}: {notice.reason}", version)  # type: ignore[attr-defined]


def exchange(host: str, port: int, message: str, timeout_s: float) -> str:
    """Send one MLLP-framed message and return the answer inside its frame."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(START + message.encode("utf-8") + END)
            answer = b""
            while not answer.endswith(END):
                chunk = sock.recv(65536)
                if not chunk:
                    raise PublishError("MLLP: the connection closed before the ACK")
                answer += chunk
    except OSError as error:
        raise PublishError(f"MLLP: {type(error).__name__}: {error}") from error
    return answer[answer.find(START) + 1 : -len(END)].decode("utf-8", errors="replace")


def check_ack(answer: str, control_id: str) -> None:
    try:
        ack = parse_message(
            answer.replace("\n", "\r"),
            find_groups=False,
            validation_level=VALIDATION_LEVEL.TOLERANT,
        )
        code = ack.msa.msa_1.to_er7()
        acknowledged = ack.msa.msa_2.to_er7()
    except Exception as error:
        raise PublishError(f"HL7: the answer is not an ACK ({type(error).__name__})") from error
    if acknowledged != control_id:
        raise PublishError(f"HL7: the ACK is for message {acknowledged!r}, not {control_id!r}")
    if code not in ACCEPTED:
        raise PublishError(f"HL7: the RIS answered MSA-1 {code!r}")
