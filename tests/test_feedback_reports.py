"""Final reports as ground truth: the NegEx-style labels, and the MLLP listener taking an
ORU^R01 from an HL7 peer (hl7apy builds it, a real TCP socket carries it, MLLP-framed)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from sqlmodel import select
from structlog.testing import capture_logs

from cadnode.core import audit
from cadnode.core.config import FeedbackMllp
from cadnode.core.db import Database, Feedback
from cadnode.core.hl7v2 import END, START
from cadnode.core.yamlfile import ConfigError
from cadnode.feedback.labels import ReportReader, load_rules
from cadnode.feedback.mllp import ReportListener
from cadnode.feedback.oru import unescape
from cadnode.prioritize.hl7 import exchange
from tests.feedback_cases import held_study, oru
from tests.peers import REPO

RULES = load_rules(REPO / "config" / "feedback.yaml")
READER = ReportReader(RULES)
STUDY, ACCESSION = "1.2.826.0.1.3680043.10.1.7", "ACC-7"

# (report text, {finding: conclusion}) for the findings named; others may be decided too.
CASES = [
    ("No pneumothorax.", {"pneumothorax": "absent"}),
    ("Pneumothorax is not seen.", {"pneumothorax": "absent"}),
    ("There is no evidence of pneumothorax.", {"pneumothorax": "absent"}),
    ("Without evidence of consolidation.", {"lung_opacity": "absent"}),
    ("No acute cardiopulmonary abnormality.", {"abnormal": "absent", "pneumothorax": "absent"}),
    ("The lungs are clear.", {"abnormal": "absent", "pleural_effusion": "absent"}),
    ("Small right apical pneumothorax.", {"pneumothorax": "present", "abnormal": "present"}),
    (
        "Cannot exclude a small pneumothorax.",
        {"pneumothorax": "uncertain", "abnormal": "uncertain"},
    ),
    ("A small pneumothorax cannot be excluded.", {"pneumothorax": "uncertain"}),
    ("Possible right lower lobe consolidation.", {"lung_opacity": "uncertain"}),
    (
        "No pneumothorax, pleural effusion or focal consolidation.",
        {"pneumothorax": "absent", "pleural_effusion": "absent", "lung_opacity": "absent"},
    ),
    (
        "No pneumothorax but there is a small left effusion.",
        {"pneumothorax": "absent", "pleural_effusion": "present", "abnormal": "present"},
    ),
    ("No change in the small left pneumothorax.", {"pneumothorax": "present"}),
    (
        "Large right pneumothorax. No other abnormality.",
        {"pneumothorax": "present", "abnormal": "present"},
    ),
    ("Resolution of the previously seen pneumothorax.", {"pneumothorax": "absent"}),
    (
        "INDICATION: rule out pneumothorax. IMPRESSION: Normal chest radiograph.",
        {"pneumothorax": "absent", "abnormal": "absent"},
    ),
    (
        "Indication: pneumothorax?\nFindings: Cardiomegaly.",
        {"cardiomegaly": "present", "abnormal": "present"},
    ),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:40] for c in CASES])
def test_reports_are_labelled_with_their_negations(text: str, expected: dict[str, str]) -> None:
    labelled = {item.finding: item.conclusion.value for item in READER.label(text)}
    assert {name: labelled.get(name) for name in expected} == expected


def test_what_a_report_does_not_mention_is_left_unlabelled() -> None:
    labelled = {item.finding for item in READER.label("Small left pleural effusion.")}
    assert labelled == {"pleural_effusion", "abnormal"}
    normal = {item.finding for item in READER.label("Normal chest radiograph.")}
    assert "mass" not in normal  # absent_when_normal: false


def test_a_findings_file_with_an_error_names_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "feedback.yaml"
    bad.write_text("findings:\n  pneumothorax:\n    terms: [pneumothorax]\n    any_of: [nope]\n")
    with pytest.raises(ConfigError, match=r"feedback\.yaml:\d+:\d+.*unknown findings"):
        load_rules(bad)


# -- the MLLP listener ------------------------------------------------------------------------


@pytest.fixture
def node_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "cadnode.db")
    yield database
    database.engine.dispose()


@pytest.fixture
def listener(node_db: Database) -> Iterator[ReportListener]:
    settings = FeedbackMllp(
        enabled=True, port=0, max_message_kb=4, timeout_s=5, allowed_facilities=["HOSP"]
    )
    running = ReportListener(settings, node_db, READER)
    running.start()
    yield running
    running.stop()


def send(listener: ReportListener, message: str) -> tuple[str, str]:
    """The ACK's MSA-1 and MSA-3 for one message sent over a fresh MLLP connection."""
    answer = exchange("127.0.0.1", listener.port, message, timeout_s=5)
    ack = parse_message(
        answer.replace("\n", "\r").strip("\r"),
        find_groups=False,
        validation_level=VALIDATION_LEVEL.TOLERANT,
    )
    return ack.msa.msa_1.to_er7(), unescape(ack.msa.msa_3.to_er7())


def conclusions(database: Database) -> dict[str, str]:
    with database.session() as session:
        rows = session.exec(select(Feedback).order_by(Feedback.id)).all()  # type: ignore[arg-type]
    return {row.finding: row.conclusion.value for row in rows}


def test_a_report_with_a_negation_labels_the_job_and_is_acknowledged(
    listener: ReportListener, node_db: Database
) -> None:
    job_id = held_study(node_db, STUDY, ACCESSION)
    code, _ = send(listener, oru(["No pneumothorax.", "Lungs are clear."], accession=ACCESSION))
    assert code == "AA"
    assert conclusions(node_db) == {name: "absent" for name in RULES.findings if name != "mass"}
    with node_db.session() as session:
        row = session.exec(select(Feedback)).first()
    assert row is not None and row.job_id == job_id and row.source == "report"
    assert row.author == "RIS@HOSP" and row.report_id == ACCESSION
    [event] = audit.events(node_db, kind="feedback.received")
    assert event.details["job_id"] == job_id


def test_a_report_without_negation_labels_the_finding_present(
    listener: ReportListener, node_db: Database
) -> None:
    held_study(node_db, STUDY, ACCESSION)
    text = ["Moderate right pneumothorax & mediastinal shift | urgent."]
    # The Study Instance UID names the study; the accession is not needed then.
    code, reason = send(listener, oru(text, study_uid=STUDY))
    assert (code, reason) == ("AA", "2 finding(s) labelled")
    assert conclusions(node_db) == {"abnormal": "present", "pneumothorax": "present"}
    with node_db.session() as session:
        row = session.exec(select(Feedback).where(Feedback.finding == "pneumothorax")).one()
    assert row.evidence == "Moderate right pneumothorax & mediastinal shift | urgent"


def test_bad_messages_are_refused_logged_and_the_listener_stays_up(
    listener: ReportListener, node_db: Database
) -> None:
    held_study(node_db, STUDY, ACCESSION)
    with capture_logs() as logs:
        unknown = send(listener, oru(["No pneumothorax."], accession="NOT-HELD"))
        not_oru = send(listener, oru(["x"], accession=ACCESSION, kind="ADT^A01^ADT_A01"))
        garbage = send(listener, "this is not HL7 at all")
        foreign = send(listener, oru(["No pneumothorax."], accession=ACCESSION, facility="ELSE"))
        big = oru(["No pneumothorax. " * 400], accession=ACCESSION, control_id="BIG1")
        oversized = send(listener, big)
        big_ack = exchange("127.0.0.1", listener.port, big, timeout_s=5)
    assert unknown[0] == "AE" and "unknown study" in unknown[1]
    assert not_oru[0] == "AR" and "ORU^R01" in not_oru[1]
    assert garbage[0] == "AR"
    assert foreign[0] == "AR" and "facility" in foreign[1]
    assert oversized[0] == "AR" and "4 KB" in oversized[1]
    assert "MSA|AR|BIG1|" in big_ack  # answering that message, read from its first bytes
    refused = [e for e in logs if e["event"] == "feedback.refused"]
    assert len(refused) == 6
    assert not any("NOT-HELD" in str(e) or "ACC-7" in str(e) for e in logs)  # no identifiers
    assert conclusions(node_db) == {}
    assert send(listener, oru(["No pneumothorax."], accession=ACCESSION))[0] == "AA"


def test_several_messages_on_one_connection_each_get_their_ack(
    listener: ReportListener, node_db: Database
) -> None:
    held_study(node_db, STUDY, ACCESSION)
    frames = b"".join(
        START + oru(["No pneumothorax."], accession=ACCESSION, control_id=f"M{n}").encode() + END
        for n in range(3)
    )
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        sock.sendall(frames)
        answers = b""
        while answers.count(END) < 3:
            chunk = sock.recv(65536)
            assert chunk, "the listener closed before its third ACK"
            answers += chunk
    assert [a.split(b"|")[0] for a in answers.split(b"MSA|")[1:]] == [b"AA"] * 3
    assert [a.split(b"|")[1] for a in answers.split(b"MSA|")[1:]] == [b"M0", b"M1", b"M2"]


def test_a_port_already_taken_is_said_at_start(listener: ReportListener, node_db: Database) -> None:
    taken = FeedbackMllp(enabled=True, port=listener.port)
    with pytest.raises(RuntimeError, match=rf"cannot listen on 127.0.0.1:{listener.port}"):
        ReportListener(taken, node_db, READER).start()
