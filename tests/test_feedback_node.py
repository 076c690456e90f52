"""The whole way round on a running node: a chest film sent by storescu, the engines' answers,
then the radiologist's final report from an HL7 peer (hl7apy builds it, MLLP carries it) to
`cadnode serve`'s own listener, labelling the job; the figures then count the study."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from sqlmodel import select

from cadnode.core.db import Database, Feedback, Result
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.prioritize.hl7 import check_ack, exchange
from cadnode.watch.performance import Key, read_cases, tabulate
from tests.feedback_cases import oru
from tests.peers import REPO, free_port, port_open, run_cadnode, storescu, wait_for
from tests.test_feedback_reports import RULES

RULES_FILE = REPO / "config" / "rules.yaml"


def test_a_report_to_the_running_node_labels_the_study_it_names(tmp_path: Path) -> None:
    mllp_port = free_port()
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(RULES_FILE),
        "feedback": {"mllp": {"enabled": True, "port": mllp_port}},
    }
    (tmp_path / "cadnode.yaml").write_text(json.dumps(config))  # JSON is YAML
    film_path = tmp_path / "film.dcm"
    film = write_chest_radiograph(film_path, seed=11, pneumothorax=True)
    with run_cadnode(
        tmp_path / "node", None, CADNODE_CONFIG=str(tmp_path / "cadnode.yaml")
    ) as node:
        assert storescu(node.dicom_port, film_path).returncode == 0
        database = Database(node.data_dir / "cadnode.db")
        wait_for(lambda: ruleout_answered(database), 60, "the rule-out engine's answer")
        wait_for(lambda: port_open(mllp_port), 10, "the MLLP listener")
        report = oru(["Large right pneumothorax."], accession=str(film.AccessionNumber))
        check_ack(exchange("127.0.0.1", mllp_port, report, 10), "RPT1")  # AA, or it raises
        normal = oru(["No pneumothorax."], accession="ACC-NOT-HELD", control_id="RPT2")
        assert "|AE|" in exchange("127.0.0.1", mllp_port, normal, 10)
        log = node.log_text()
    with database.session() as session:
        rows = session.exec(select(Feedback)).all()
        since = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        table = tabulate(read_cases(session, RULES, since=since, max_rows=100))
    assert {(r.finding, r.conclusion) for r in rows} == {
        ("pneumothorax", "present"),
        ("abnormal", "present"),
    }
    assert rows[0].study_uid == film.StudyInstanceUID
    ruleout = table[Key("cxr-ruleout", "0.1.0", "abnormal", "rule_out")]
    assert ruleout.tp + ruleout.fn == 1  # the study counted once, against the report
    assert '"event": "feedback.report"' in log and '"feedback.refused"' in log
    assert str(film.AccessionNumber) not in log and "PHANTOM" not in log


def ruleout_answered(database: Database) -> bool:
    with database.session() as session:
        return (
            session.exec(select(Result).where(Result.engine == "cxr-ruleout")).first() is not None
        )
