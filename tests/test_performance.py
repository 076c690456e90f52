"""The engines measured against the radiologists (cadnode.watch.performance): the figures of
a 2x2 table computed by hand, exact intervals against scipy, and the cases read back from
the database (latest conclusion wins, uncertain ones left out, any image counts)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from scipy.stats import binomtest

from cadnode.cli import main
from cadnode.core.db import Conclusion, Database, Feedback, FeedbackSource
from cadnode.watch.performance import Case, Key, by_week, figures, proportion, read_cases, tabulate
from tests.feedback_cases import held_study, ruleout_result
from tests.test_feedback_reports import RULES

KEY = Key("cxr-ruleout", "0.1.0", "abnormal", "rule_out")
MONDAY = dt.datetime(2026, 11, 30, 9, tzinfo=dt.UTC)


def cases(tp: int, fp: int, fn: int, tn: int, at: dt.datetime = MONDAY) -> list[Case]:
    cells = [(True, True)] * tp + [(True, False)] * fp + [(False, True)] * fn
    cells += [(False, False)] * tn
    return [Case(KEY, n, predicted, truth, at) for n, (predicted, truth) in enumerate(cells)]


def test_the_figures_of_a_hand_computed_table() -> None:
    # 18 abnormal studies, 16 flagged; 22 normal ones, 3 flagged.
    table = figures(cases(tp=16, fp=3, fn=2, tn=19))
    assert (table.tp, table.fp, table.fn, table.tn, table.cases) == (16, 3, 2, 19, 40)
    assert table.sensitivity.value == pytest.approx(16 / 18)
    assert table.specificity.value == pytest.approx(19 / 22)
    assert table.ppv.value == pytest.approx(16 / 19)
    assert table.npv.value == pytest.approx(19 / 21)
    for share, (k, n) in zip(
        (table.sensitivity, table.specificity, table.ppv, table.npv),
        ((16, 18), (19, 22), (16, 19), (19, 21)),
        strict=True,
    ):
        exact = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert (share.low, share.high) == pytest.approx((exact.low, exact.high), abs=1e-9)


def test_exact_intervals_at_the_edges() -> None:
    # 10 of 10: the lower bound is (alpha/2)^(1/n), the known closed form; 0 of 0: nothing.
    assert proportion(10, 10).low == pytest.approx(0.025 ** (1 / 10))
    assert proportion(10, 10).high == 1.0
    assert proportion(0, 10).low == 0.0
    assert proportion(0, 10).high == pytest.approx(1 - 0.025 ** (1 / 10))
    assert proportion(0, 0).value is None


def test_figures_per_week() -> None:
    later = MONDAY + dt.timedelta(days=9)  # a Wednesday, the next week
    weekly = by_week(cases(1, 0, 1, 0) + cases(0, 1, 0, 1, at=later))[KEY]
    assert list(weekly) == [dt.date(2026, 11, 30), dt.date(2026, 12, 7)]
    assert [(f.tp, f.fn, f.fp, f.tn) for f in weekly.values()] == [(1, 1, 0, 0), (0, 0, 1, 1)]


def test_cases_are_read_per_version_and_operating_point(database: Database) -> None:
    truth = {"A": "present", "B": "absent", "C": "present", "D": "uncertain"}
    jobs = {name: held_study(database, f"1.2.3.{n}") for n, name in enumerate(truth)}
    with database.session() as session:
        session.add_all(
            [
                # A: one of two images reaches rule_out (the study counts as positive).
                ruleout_result(jobs["A"], abnormal=False, image="1.1"),
                ruleout_result(jobs["A"], abnormal=True, urgent=False, image="1.2"),
                ruleout_result(jobs["B"], abnormal=True, urgent=False),
                ruleout_result(jobs["C"], abnormal=False),
                ruleout_result(jobs["D"], abnormal=True),
                ruleout_result(jobs["A"], abnormal=True, version="0.2.0"),  # a shadow version
                ruleout_result(jobs["B"], abnormal=False, version="0.2.0"),
            ]
        )
        for name, conclusion in truth.items():
            # Each study first said the opposite (the latest conclusion is what counts).
            session.add(
                conclusion_row(jobs[name], "absent" if conclusion != "absent" else "present")
            )
            session.add(conclusion_row(jobs[name], conclusion))
        session.commit()
        since = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        table = tabulate(read_cases(session, RULES, since=since, max_rows=1000))
    cells = {(k.version, k.point): (f.tp, f.fp, f.fn, f.tn) for k, f in table.items()}
    assert cells == {
        ("0.1.0", "rule_out"): (1, 1, 1, 0),  # A caught, B a false alarm, C missed
        ("0.1.0", "urgent"): (0, 0, 2, 1),
        ("0.2.0", "rule_out"): (1, 0, 0, 1),
        ("0.2.0", "urgent"): (1, 0, 0, 1),
    }
    assert {k.finding for k in table} == {"abnormal"}


def conclusion_row(job_id: int, conclusion: str) -> Feedback:
    return Feedback(
        job_id=job_id,
        study_uid="x",
        finding="abnormal",
        conclusion=Conclusion(conclusion),
        source=FeedbackSource.api,
        author="RIS",
    )


def test_cadnode_performance_prints_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cadnode.yaml"
    config.write_text(json.dumps({"storage": {"data_dir": str(tmp_path / "var")}}))
    monkeypatch.setenv("CADNODE_CONFIG", str(config))
    monkeypatch.delenv("CADNODE_DATA_DIR", raising=False)
    (tmp_path / "var").mkdir()
    database = Database(tmp_path / "var" / "cadnode.db")
    job_id = held_study(database, "1.2.3.9")
    with database.session() as session:
        session.add(ruleout_result(job_id, abnormal=True))
        session.add(conclusion_row(job_id, "present"))
        session.commit()
    assert main(["performance", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    rule_out = next(r for r in rows if r["operating_point"] == "rule_out")
    assert (rule_out["tp"], rule_out["sensitivity"]["of"]) == (1, "1/1")
    assert rule_out["sensitivity"]["low"] == pytest.approx(0.025)
    assert main(["performance"]) == 0
    assert "cxr-ruleout" in capsys.readouterr().out
