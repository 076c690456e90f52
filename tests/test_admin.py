"""The admin port without a browser: login, CSRF, readiness, metrics, thumbnails, the audit
trail and the admin's commands, on a database seeded as the stages would have left it."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cadnode.admin.app import AdminServer, create_app
from cadnode.admin.auth import Gate, Outcome, Verdict, hash_password
from cadnode.admin.commands import show_status
from cadnode.admin.context import AdminContext, EngineInfo
from cadnode.admin.throttle import Busy, CheckPool, FailureLimiter
from cadnode.cli import main
from cadnode.core import audit
from cadnode.core.config import HttpSettings, Settings
from cadnode.core.db import (
    AuditKind,
    AuditOutcome,
    Database,
    Delivery,
    DeliveryState,
    FailureKind,
    JobState,
    PriorityClass,
    Result,
    utcnow,
)
from cadnode.infer.answers import (
    ClassifyAnswer,
    PointReached,
    SegmentAnswer,
    SegmentFinding,
    dump_answer,
    save_masks,
)
from cadnode.infer.bundle import Bundle, discover
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.route import load_rules
from tests.peers import REPO, free_port, port_open, wait_for
from tests.rows import instance_row, new_job

PASSWORD = "correct horse battery"
TOKEN = "scrape-token-0123456789"
PASSWORD_HASH = hash_password(PASSWORD)
TOKEN_HASH = hash_password(TOKEN)
ENGINES = REPO / "engines"
RULEOUT = Bundle(ENGINES / "cxr-ruleout").manifest
SEGMENTER = Bundle(ENGINES / "cxr-segmenter").manifest
PAGES = ["/studies", "/queues", "/rules", "/engines", "/charts", "/audit", "/jobs/1"]


@dataclass
class Seeded:
    context: AdminContext
    job_id: int
    classify_id: int
    segment_id: int
    dead_letter_id: int


def make_context(data_dir: Path, **http: object) -> AdminContext:
    settings = Settings.model_validate(
        {
            "storage": {"data_dir": str(data_dir), "min_free_mb": 1},
            "engines": {"dir": str(ENGINES)},
            "rules": str(REPO / "config" / "rules.yaml"),
            "http": {
                "admin_password_hash": PASSWORD_HASH,
                "admin_token_hash": TOKEN_HASH,
                **http,
            },
        }
    )
    settings.storage.spool.mkdir(parents=True, exist_ok=True)
    bundles = discover(ENGINES)
    rules = load_rules(settings.rules, bundles)
    return AdminContext(
        settings=settings,
        database=Database(settings.storage.database),
        configured_engines=sorted(bundles),
        engines=[EngineInfo.of(bundle, "onnxruntime") for bundle in bundles.values()],
        rules=lambda: rules,
    )


def seed(context: AdminContext) -> Seeded:
    """One chest film through the flow: results of two engines, one delivery dead-lettered."""
    storage = context.settings.storage
    film = write_chest_radiograph(storage.spool / "chest.dcm", seed=7, patient_id="PID-ADMIN-1")
    rows, columns = int(film.Rows), int(film.Columns)
    masks = np.zeros((1, 2, rows, columns), dtype=bool)
    masks[0, 0, 100:200, 300:400] = True  # a pneumothorax segment, drawn in the first colour
    save_masks(storage.answers / "seg.npz", masks)
    start = utcnow() - dt.timedelta(seconds=30)
    timeline = {
        state: (start + dt.timedelta(seconds=offset)).isoformat()
        for state, offset in (("complete", 1), ("routed", 1.5), ("inferred", 3.5), ("encoded", 4))
    }
    with context.database.session() as session:
        job = new_job(
            session, str(film.StudyInstanceUID), state=JobState.failed, rule="chest-radiograph",
            reason="a result could not be delivered (dead letter)",
            failure=FailureKind.dead_letter,
            priority=PriorityClass.urgent, instance_count=1, first_instance_at=start,
            pipeline=[{"engine": "cxr-ruleout"}, {"engine": "cxr-segmenter"}],
            timeline={**timeline, "failed": (start + dt.timedelta(seconds=9)).isoformat()},
        )
        assert job.id is not None
        session.add(instance_row(film, "chest.dcm", job, calling_ae="MOD1"))
        classify = Result(
            job_id=job.id, engine="cxr-ruleout", engine_version="1", model_sha256="0" * 64,
            sop_instance_uid=str(film.SOPInstanceUID),
            answer=dump_answer(ClassifyAnswer(
                label=RULEOUT.labels[0], probability=0.91,
                operating_points={"rule_out": PointReached(threshold=0.2, reached=True)},
                ruled_out=False,
            )),
            seconds=0.02,
        )
        segment = Result(
            job_id=job.id, engine="cxr-segmenter", engine_version="1", model_sha256="1" * 64,
            sop_instance_uid=str(film.SOPInstanceUID),
            answer=dump_answer(SegmentAnswer(
                mask_file="seg.npz", frames=1, rows=rows, columns=columns,
                findings=[SegmentFinding(
                    label=SEGMENTER.labels[2], segment_number=1, probability=0.8,
                    operating_points={"present": PointReached(threshold=0.5, reached=True)},
                    measurements={"percent_of_hemithorax": 12.0},
                )],
            )),
            seconds=0.3,
        )
        dead = Delivery(
            object_uid="1.2.3.4", job_id=job.id, destination="PACS@127.0.0.1:1",
            state=DeliveryState.failed, attempts=3, last_error="association not established",
        )
        session.add_all([classify, segment, dead])
        session.commit()
        assert classify.id and segment.id and dead.id
        seeded = Seeded(context, job.id, classify.id, segment.id, dead.id)
    audit.record(
        context.database, audit.ASSOCIATION, actor="STRANGER", address="10.0.0.9:4242",
        outcome=AuditOutcome.rejected, reason="calling AE title is not a configured peer",
    )
    return seeded


@pytest.fixture
def seeded(tmp_path: Path) -> Seeded:
    return seed(make_context(tmp_path / "var"))


@pytest.fixture
def client(seeded: Seeded) -> Iterator[TestClient]:
    with TestClient(create_app(seeded.context), follow_redirects=False) as test_client:
        yield test_client


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no CSRF token in the page"
    return match[1]


def log_in(client: TestClient, password: str = PASSWORD) -> int:
    token = csrf_of(client.get("/login").text)
    answer = client.post("/login", data={"password": password, "csrf": token, "next": "/queues"})
    return answer.status_code


def test_every_page_needs_a_login(client: TestClient) -> None:
    for page in PAGES:
        answer = client.get(page)
        assert answer.status_code == 303, page
        assert answer.headers["location"].startswith("/login?next=")
    assert client.get("/metrics").status_code == 401
    assert client.get("/healthz").json()["status"] == "ok"


def test_a_wrong_password_is_refused_and_audited(client: TestClient, seeded: Seeded) -> None:
    assert log_in(client, "guess") == 401
    assert client.get("/studies").status_code == 303
    [event] = audit.events(seeded.context.database, kind="admin.login")
    assert event.outcome == "refused"


def test_pages_render_after_login(client: TestClient, seeded: Seeded) -> None:
    assert log_in(client) == 303
    for page in PAGES:
        answer = client.get(page)
        assert answer.status_code == 200, page
        assert "Content-Security-Policy" in answer.headers
    studies = client.get("/studies").text
    assert "chest-radiograph" in studies and "abnormal (0.91)" in studies
    assert "pneumothorax (12% of hemithorax)" in studies
    job = client.get(f"/jobs/{seeded.job_id}").text
    assert f"/results/{seeded.segment_id}/overlay.png" in job
    assert "association not established" in client.get("/queues").text
    engines = client.get("/engines").text
    assert 'src="/engines/cxr-ruleout/roc.png"' in engines
    assert client.get("/engines/cxr-ruleout/roc.png").headers["content-type"] == "image/png"
    assert client.get("/engines/cxr-ruleout/manifest.yaml").status_code == 404
    charts = client.get("/charts").text
    assert charts.count("<svg") == 2 and "inferred" in charts


def test_the_thumbnail_draws_the_mask_over_the_image(client: TestClient, seeded: Seeded) -> None:
    log_in(client)
    plain = _png(client.get(f"/results/{seeded.classify_id}/overlay.png").content)
    masked = _png(client.get(f"/results/{seeded.segment_id}/overlay.png").content)
    assert plain.shape == masked.shape and plain.shape[2] == 3
    assert np.ptp(plain) > 50  # the film itself, not a blank
    colour = np.abs(masked.astype(int) - masked.mean(axis=2, keepdims=True)).max(axis=2)
    assert (colour > 40).sum() > 100  # the segment's colour; the bare film is grey only
    assert (np.abs(plain.astype(int) - plain.mean(axis=2, keepdims=True)) < 2).all()


def _png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def test_posts_without_the_sessions_csrf_token_are_refused(
    client: TestClient, seeded: Seeded
) -> None:
    log_in(client)
    retry = f"/deliveries/{seeded.dead_letter_id}/retry"
    assert client.post(retry).status_code == 403
    assert client.post(retry, data={"csrf": "forged"}).status_code == 403
    assert delivery_state(seeded) == "failed"
    token = csrf_of(client.get("/queues").text)
    answer = client.post(retry, data={"csrf": token})
    assert answer.status_code == 303
    assert "pending again" in client.get(answer.headers["location"]).text
    assert delivery_state(seeded) == "pending"
    [event] = audit.events(seeded.context.database, kind="admin.delivery.retry")
    assert event.actor == "admin (dashboard)"


def delivery_state(seeded: Seeded) -> str:
    with seeded.context.database.session() as session:
        delivery = session.get(Delivery, seeded.dead_letter_id)
        assert delivery is not None
        return delivery.state.value


def test_the_login_form_itself_needs_its_csrf_token(client: TestClient) -> None:
    client.get("/login")
    assert client.post("/login", data={"password": PASSWORD}).status_code == 403


def test_the_session_cookie_is_httponly_strict_and_secure_when_asked(tmp_path: Path) -> None:
    for http, secure in (({}, False), ({"secure_cookie": True}, True)):
        context = make_context(tmp_path / f"var-{secure}", **http)
        with TestClient(create_app(context), base_url="https://testserver") as client:
            cookie = client.get("/login").headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert ("secure" in cookie.split(";")[-1] or "; secure" in cookie) is secure


def test_logging_out_ends_the_session_for_good(client: TestClient) -> None:
    log_in(client)
    stolen = dict(client.cookies)
    token = csrf_of(client.get("/studies").text)
    assert client.post("/logout", data={"csrf": token}).status_code == 303
    client.cookies.clear()
    client.cookies.update(stolen)  # the cookie as it was before logging out
    assert client.get("/studies").status_code == 303


def test_metrics_need_the_token_and_count_from_the_database(client: TestClient) -> None:
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    text = answer.text
    for line in (
        'cadnode_instances_received_total{calling_ae="MOD1"} 1.0',
        'cadnode_studies_received_total{calling_ae="MOD1"} 1.0',
        'cadnode_association_rejections_total{reason="calling AE title is not a configured peer"}'
        " 1.0",
        'cadnode_jobs{priority="urgent",state="failed"} 1.0',
        'cadnode_jobs{priority="routine",state="routed"} 0.0',
        'cadnode_stage_seconds_bucket{le="2.5",stage="inferred"} 1.0',
        'cadnode_stage_seconds_bucket{le="1.0",stage="inferred"} 0.0',
        'cadnode_stage_seconds_count{stage="routed"} 1.0',
        'cadnode_engine_positive_rate{engine="cxr-ruleout"} 1.0',
        'cadnode_engine_inference_seconds_count{engine="cxr-segmenter"} 1.0',
        'cadnode_engine_inference_seconds_bucket{engine="cxr-segmenter",le="0.25"} 0.0',
        'cadnode_engine_inference_seconds_bucket{engine="cxr-segmenter",le="0.5"} 1.0',
        'cadnode_engine_inference_seconds_bucket{engine="cxr-ruleout",le="0.05"} 1.0',
        'cadnode_delivery_retries_total{destination="PACS@127.0.0.1:1"} 2.0',
        'cadnode_dead_letters{destination="PACS@127.0.0.1:1",outbox="results"} 1.0',
    ):
        assert line in text, line
    assert re.search(r'cadnode_disk_free_bytes\{path="spool"\} \d', text)


def test_readyz_names_what_is_not_ready(tmp_path: Path) -> None:
    context = make_context(tmp_path / "var")
    client = TestClient(create_app(context))
    assert client.get("/readyz").json()["ready"] is True

    context.engines = [e for e in context.engines if e.name != "cxr-ruleout"]
    report = client.get("/readyz")
    assert report.status_code == 503
    assert "not loaded: cxr-ruleout" in report.json()["checks"]["engines"]["detail"]

    context.engines = make_context(tmp_path / "var").engines
    context.settings.storage.min_free_mb = 1e12
    report = client.get("/readyz")
    assert report.status_code == 503 and "watermark" in report.json()["checks"]["spool"]["detail"]

    context.settings.storage.min_free_mb = 1
    shutil.rmtree(context.settings.storage.spool)
    context.settings.storage.spool.write_text("not a folder")
    assert client.get("/readyz").json()["checks"]["spool"]["ok"] is False

    context.database.engine.dispose()
    shutil.move(context.settings.storage.database, tmp_path / "moved.db")
    context.settings.storage.data_dir.rename(tmp_path / "gone")
    (tmp_path / "var").write_text("the data folder is now a file")
    report = client.get("/readyz").json()
    assert report["ready"] is False and report["checks"]["database"]["ok"] is False


def test_cadnode_status_asks_the_running_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    context = make_context(tmp_path / "var", port=port)
    http = HttpSettings(port=port)
    assert show_status(http) == 1
    assert "not answering" in capsys.readouterr().out
    server = AdminServer(context)
    server.start()
    try:
        wait_for(lambda: port_open(port), 30, "the admin port")
        assert show_status(http) == 0
        assert "ready" in capsys.readouterr().out
        context.engines = []
        assert show_status(http) == 1
        out = capsys.readouterr().out
        assert "NOT READY" in out and "engines   FAIL" in out
    finally:
        server.stop()


def test_audit_export_as_json_lines(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    database = seeded.context.database
    audit.record(
        database, AuditKind.admin_login, actor="admin", outcome=AuditOutcome.ok, address="127.0.0.1"
    )
    monkeypatch.setenv("CADNODE_DATA_DIR", str(seeded.context.settings.storage.data_dir))
    assert main(["audit", "--since", "1h"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds == ["association", "admin.login"]
    assert main(["audit", "--since", "2000-01-01T00:00:00", "--kind", "admin"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    future = (utcnow() + dt.timedelta(hours=1)).isoformat()
    assert main(["audit", "--since", future]) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit", "--since", "yesterday"]) == 2


def test_parse_since_takes_durations_and_times() -> None:
    now = dt.datetime(2025, 1, 2, 12, 0, tzinfo=dt.UTC)
    assert audit.parse_since("90m", now) == now - dt.timedelta(minutes=90)
    assert audit.parse_since("7d", now) == now - dt.timedelta(days=7)
    assert audit.parse_since("2025-01-01T06:00:00") == dt.datetime(2025, 1, 1, 6, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="ISO 8601"):
        audit.parse_since("last week")


def test_hash_password_prints_a_hash_that_verifies(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough secret\n"))
    assert main(["hash-password"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("$argon2id$")
    assert HttpSettings(admin_password_hash=printed).admin_password_hash == printed
    from cadnode.admin.auth import verify

    assert verify(printed, "a long enough secret") and not verify(printed, "another")


def test_rules_explain_for_an_uploaded_file(client: TestClient, tmp_path: Path) -> None:
    log_in(client)
    film = tmp_path / "upload.dcm"
    write_chest_radiograph(film, seed=3)
    token = csrf_of(client.get("/rules").text)
    answer = client.post(
        "/rules/explain",
        data={"csrf": token},
        files={"file": ("film.dcm", film.read_bytes(), "application/dicom")},
    )
    assert answer.status_code == 200
    assert "chest-radiograph" in answer.text and "film.dcm" in answer.text
    token = csrf_of(answer.text)
    garbage = client.post(
        "/rules/explain",
        data={"csrf": token},
        files={"file": ("notes.txt", b"hello", "text/plain")},
    )
    assert "notes.txt: not a DICOM file" in garbage.text


# -- hardening: the guard, the limits, the check pool ---------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_failure_limiter_counts_a_sliding_minute_and_checks_in_flight() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, clock=clock)
    for _ in range(3):  # three checks at once fill the allowance before any has failed
        assert limiter.admit("10.0.0.1") is None
    lockout = limiter.admit("10.0.0.1")
    assert lockout is not None and lockout.new and lockout.retry_after_s == 1
    assert limiter.admit("10.0.0.2") is None  # another address is its own
    for seconds in (0, 10, 20):
        clock.now += seconds
        limiter.settle("10.0.0.1", failed=True)
    clock.now += 1
    lockout = limiter.check("10.0.0.1")
    assert lockout is not None and lockout.failures == 3 and lockout.new
    assert lockout.retry_after_s == 60 - 31  # until the first failure is a minute old
    clock.now += 5
    again = limiter.admit("10.0.0.1")
    assert again is not None and not again.new  # one lockout is audited once
    clock.now += again.retry_after_s
    assert limiter.admit("10.0.0.1") is None  # the oldest failure aged out: one more try
    limiter.settle("10.0.0.1", failed=False)


def test_the_failure_limiter_forgets_the_least_recent_address_past_its_table() -> None:
    limiter = FailureLimiter(1, max_addresses=2)
    limiter.admit("a")
    limiter.settle("a", failed=True)
    limiter.admit("b")
    limiter.admit("c")  # a, seen least recently, is forgotten
    assert limiter.check("a") is None
    assert limiter.check("b") is not None  # b's check is still in flight


def test_the_check_pool_refuses_past_its_queue_and_frees_slots_as_checks_end() -> None:
    release = threading.Event()

    async def scenario() -> list[object]:
        pool = CheckPool(workers=1, queue=1)
        first = asyncio.ensure_future(pool.run(release.wait))
        second = asyncio.ensure_future(pool.run(lambda: "queued"))
        await asyncio.sleep(0)
        with pytest.raises(Busy):
            await pool.run(lambda: "one too many")
        release.set()
        done = [await first, await second, await pool.run(lambda: "after")]
        pool.close()
        return done

    assert asyncio.run(scenario()) == [True, "queued", "after"]


def test_checks_beyond_the_pool_are_answered_busy_without_a_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, running = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_verify(hashed: str | None, secret: str) -> bool:
        calls.append(secret)
        running.set()
        release.wait(10)
        return False

    monkeypatch.setattr("cadnode.admin.auth.verify", slow_verify)
    context = make_context(tmp_path / "var")
    gate = Gate(context.settings.http, context.database)
    gate.pool = CheckPool(workers=1, queue=0)

    async def scenario() -> tuple[Verdict, Verdict]:
        first = asyncio.ensure_future(gate.check_password("10.0.0.1", "guess one"))
        await asyncio.get_running_loop().run_in_executor(None, running.wait, 10)
        second = await gate.check_password("10.0.0.2", "guess two")
        release.set()
        return await first, second

    first, second = asyncio.run(scenario())
    gate.close()
    assert first.outcome is Outcome.wrong
    assert second.outcome is Outcome.busy and second.retry_after_s >= 1
    assert calls == ["guess one"]


def test_anonymous_requests_are_turned_away_before_their_body(client: TestClient) -> None:
    upload = client.post(
        "/rules/explain", files={"file": ("big.dcm", bytes(2**20), "application/dicom")}
    )
    assert upload.status_code == 303 and upload.headers["location"] == "/login?next=/rules/explain"
    assert upload.headers["connection"] == "close"  # the rest is not read to be thrown away
    assert client.post("/metrics", content=b"x" * 100).status_code == 401


def test_bodies_past_their_limit_are_refused(tmp_path: Path) -> None:
    context = make_context(tmp_path / "var", max_form_kb=1, max_upload_mb=0.01)
    with TestClient(create_app(context), follow_redirects=False) as client:
        csrf = csrf_of(client.get("/login").text)
        form = client.post("/login", data={"password": "x" * 2000, "csrf": csrf})
        assert form.status_code == 413
        assert log_in(client) == 303
        csrf = csrf_of(client.get("/rules").text)
        file = {"file": ("big.dcm", bytes(20_000), "application/dicom")}
        assert client.post("/rules/explain", data={"csrf": csrf}, files=file).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
            yield from (b"x" * 512 for _ in range(8))

        chunked = client.post("/deliveries/1/retry", content=chunks())
        assert chunked.status_code == 413
        assert client.post("/logout", headers={"content-length": "ten"}).status_code == 400


def test_wrong_tokens_lock_the_address_out_and_are_audited(tmp_path: Path) -> None:
    context = make_context(tmp_path / "var", auth_failures_per_minute=3)
    with TestClient(create_app(context), follow_redirects=False) as client:
        answers = [
            client.get("/metrics", headers={"Authorization": f"Bearer wrong-{n}"})
            for n in range(4)
        ]
        assert [a.status_code for a in answers] == [401, 401, 401, 429]
        assert 1 <= int(answers[-1].headers["retry-after"]) <= 60
        right = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 429  # locked out: not even the right token is checked
        assert log_in(client) == 429  # nor the password
    kinds = [(e.kind, e.outcome) for e in audit.events(context.database, kind="admin")]
    assert kinds == [("admin.token", "refused")] * 3 + [("admin.lockout", "refused")]


def test_wrong_passwords_lock_the_login_out(tmp_path: Path) -> None:
    context = make_context(tmp_path / "var", auth_failures_per_minute=2)
    with TestClient(create_app(context), follow_redirects=False) as client:
        assert [log_in(client, "guess") for _ in range(2)] == [401, 401]
        page = client.get("/login")
        answer = client.post(
            "/login", data={"password": PASSWORD, "csrf": csrf_of(page.text), "next": "/"}
        )
        assert answer.status_code == 429 and int(answer.headers["retry-after"]) >= 1
        assert "try again" in answer.text
    [lockout] = audit.events(context.database, kind="admin.lockout")
    assert lockout.address == "testclient" and lockout.details["failures"] == 2


@pytest.mark.parametrize("bad", [str(10**22), str(2**63), "0", "-4", "12a", "\u00b2"])
def test_ids_that_cannot_name_a_row_are_not_found(
    client: TestClient, seeded: Seeded, bad: str
) -> None:
    log_in(client)
    assert client.get(f"/jobs/{bad}").status_code == 404
    assert client.get(f"/results/{bad}/overlay.png").status_code == 404
    csrf = csrf_of(client.get("/queues").text)
    for action in ("retry", "discard"):
        assert client.post(f"/deliveries/{bad}/{action}", data={"csrf": csrf}).status_code == 404
    assert client.get(f"/jobs/{seeded.job_id}").status_code == 200


def test_readyz_writes_to_the_database_file_it_opened(tmp_path: Path) -> None:
    context = make_context(tmp_path / "var")
    client = TestClient(create_app(context))
    ready = client.get("/readyz").json()["checks"]["database"]
    assert ready["ok"] and "round trip" in ready["detail"]
    database = context.settings.storage.database
    kept = tmp_path / "kept.db"
    os.link(database, kept)
    database.unlink()
    gone = client.get("/readyz")
    assert gone.status_code == 503 and "deleted" in gone.json()["checks"]["database"]["detail"]
    os.link(kept, database)
    assert client.get("/readyz").status_code == 200
    shutil.copy(database, tmp_path / "copy.db")
    os.replace(tmp_path / "copy.db", database)
    replaced = client.get("/readyz").json()["checks"]["database"]
    assert not replaced["ok"] and "replaced" in replaced["detail"]
