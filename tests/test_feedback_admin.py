"""Feedback through the admin port: a RIS's POST /api/feedback (its token before its body),
the dashboard's agree / disagree (CSRF, audited), the performance page and metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlmodel import select

from cadnode.admin.app import create_app
from cadnode.admin.context import AdminContext
from cadnode.core import audit
from cadnode.core.config import Settings
from cadnode.core.db import Database, Feedback
from cadnode.route import RuleSet
from cadnode.watch import performance
from tests.feedback_cases import held_study, ruleout_result, segmenter_result
from tests.test_admin import PASSWORD, TOKEN, csrf_of, log_in

RIS_TOKEN = "ris-feedback-token-0123456789"
# Cheap Argon2 parameters (a check reads them from the hash): these tests are about feedback,
# and the unit subset stays fast.
_CHEAP = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
PASSWORD_HASH, TOKEN_HASH, RIS_HASH = (_CHEAP.hash(s) for s in (PASSWORD, TOKEN, RIS_TOKEN))
STUDY, ACCESSION = "1.2.826.0.1.3680043.10.1.9", "ACC-9"


def make_context(data_dir: Path) -> AdminContext:
    """The admin port's context (no rules: no page here reads them)."""
    settings = Settings.model_validate(
        {
            "storage": {"data_dir": str(data_dir), "min_free_mb": 1},
            "http": {"admin_password_hash": PASSWORD_HASH, "admin_token_hash": TOKEN_HASH},
            "feedback": {"api_clients": {"RIS": RIS_HASH}},
        }
    )
    settings.storage.spool.mkdir(parents=True)

    def no_rules() -> RuleSet:
        raise AssertionError("no page of these tests reads the routing rules")

    return AdminContext(
        settings=settings,
        database=Database(settings.storage.database),
        configured_engines=[],
        engines=[],
        rules=no_rules,
    )


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    context = make_context(tmp_path / "var")
    job_id = held_study(context.database, STUDY, ACCESSION)
    with context.database.session() as session:
        session.add_all(
            [ruleout_result(job_id, abnormal=True), segmenter_result(job_id, pneumothorax=False)]
        )
        session.commit()
    with TestClient(create_app(context), follow_redirects=False) as test_client:
        test_client.app_state = context  # type: ignore[attr-defined]
        test_client.job_id = job_id  # type: ignore[attr-defined]
        yield test_client


def rows(client: TestClient) -> list[Feedback]:
    database = client.app_state.database  # type: ignore[attr-defined]
    with database.session() as session:
        return list(session.exec(select(Feedback).order_by(Feedback.id)))  # type: ignore[arg-type]


BODY = {
    "accession_number": ACCESSION,
    "report_id": "R-1",
    "findings": [{"finding": "pneumothorax", "conclusion": "present"}],
}


def test_the_api_refuses_without_its_token_before_reading_the_body(client: TestClient) -> None:
    anonymous = client.post("/api/feedback", content=b"{" + b" " * 2**20)
    assert anonymous.status_code == 401
    assert anonymous.headers["connection"] == "close"  # the megabyte is not read to be dropped
    wrong = client.post("/api/feedback", json=BODY, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    log_in(client)  # a dashboard session is not a RIS's token
    assert client.post("/api/feedback", json=BODY).status_code == 401
    assert rows(client) == []


def test_the_api_takes_a_ris_conclusion_with_its_token(client: TestClient) -> None:
    ris = {"Authorization": f"Bearer {RIS_TOKEN}"}
    answer = client.post("/api/feedback", json=BODY, headers=ris)
    assert answer.status_code == 201, answer.text
    [row] = rows(client)
    assert (row.finding, row.conclusion, row.source, row.author, row.report_id) == (
        "pneumothorax",
        "present",
        "api",
        "RIS",
        "R-1",
    )
    assert answer.json() == {"job_id": row.job_id, "stored": 1}
    unknown = client.post(
        "/api/feedback", headers=ris, json={**BODY, "accession_number": "NOT-HELD"}
    )
    assert unknown.status_code == 404
    bad = client.post(
        "/api/feedback",
        headers=ris,
        json={**BODY, "findings": [{"finding": "spleen", "conclusion": "present"}]},
    )
    assert bad.status_code == 422 and "spleen" in bad.text
    extra = client.post("/api/feedback", headers=ris, json={**BODY, "patient": "x"})
    assert extra.status_code == 422
    too_big = client.post("/api/feedback", headers=ris, content=b"[" + b"1," * 40_000 + b"1]")
    assert too_big.status_code == 413  # http.max_form_kb
    admin = client.post("/api/feedback", json=BODY, headers={"Authorization": f"Bearer {TOKEN}"})
    assert admin.status_code == 201 and rows(client)[-1].author == "ADMIN"


def test_the_dashboard_agree_and_disagree_write_feedback_and_audit(client: TestClient) -> None:
    log_in(client)
    job_id = client.job_id  # type: ignore[attr-defined]
    page = client.get(f"/jobs/{job_id}").text
    assert "Radiologist feedback" in page and "cxr-segmenter" in page
    form = {"finding": "pneumothorax", "conclusion": "present", "agreement": "disagree"}
    assert client.post(f"/jobs/{job_id}/feedback", data=form).status_code == 403  # no CSRF
    assert rows(client) == []
    token = csrf_of(page)
    answer = client.post(f"/jobs/{job_id}/feedback", data={**form, "csrf": token})
    assert answer.status_code == 303
    agree = {"finding": "abnormal", "conclusion": "present", "csrf": token}
    assert client.post(f"/jobs/{job_id}/feedback", data=agree).status_code == 303
    assert [(r.finding, r.conclusion, r.source) for r in rows(client)] == [
        ("pneumothorax", "present", "dashboard"),
        ("abnormal", "present", "dashboard"),
    ]
    database = client.app_state.database  # type: ignore[attr-defined]
    events = list(audit.events(database, kind="admin.feedback"))
    assert [e.details["conclusions"] for e in events] == [
        {"pneumothorax": "present"},
        {"abnormal": "present"},
    ]
    assert events[0].actor == "admin (dashboard)"
    assert "recorded: pneumothorax present" in client.get(answer.headers["location"]).text
    bad = client.post(f"/jobs/{job_id}/feedback", data={**form, "finding": "x", "csrf": token})
    assert bad.status_code == 422


def test_the_performance_page_and_metrics_show_the_figures(client: TestClient) -> None:
    ris = {"Authorization": f"Bearer {RIS_TOKEN}"}
    body = {
        **BODY,
        "findings": [
            {"finding": "pneumothorax", "conclusion": "present"},
            {"finding": "abnormal", "conclusion": "present"},
        ],
    }
    assert client.post("/api/feedback", json=body, headers=ris).status_code == 201
    performance._last.clear()  # the scrape's cache of an earlier test's database
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert (
        'cadnode_engine_sensitivity{engine="cxr-ruleout",finding="abnormal",'
        'operating_point="rule_out",version="0.1.0"} 1.0'
    ) in metrics
    assert (
        'cadnode_engine_sensitivity{engine="cxr-segmenter",finding="pneumothorax",'
        'operating_point="present",version="0.1.0"} 0.0'
    ) in metrics
    assert 'cadnode_engine_sensitivity_high{engine="cxr-segmenter"' in metrics
    log_in(client)
    page = client.get("/performance").text
    assert "cxr-segmenter" in page and "0.000 <small>[0.000, 0.975] 0/1" in page
