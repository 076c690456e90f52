"""The dashboard's pages, rendered on the server (Jinja2), each behind the login.

Every POST carries the session's CSRF token (a hidden `csrf` field); every admin action is
kept in the audit trail. Actions on deliveries are the ones `cadnode deliveries` runs.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any

import markdown
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool

from cadnode.admin import charts, data
from cadnode.admin.auth import Gate, Outcome, Verdict, client_address
from cadnode.admin.context import AdminContext
from cadnode.admin.feedback_data import job_feedback
from cadnode.admin.thumbnails import overlay_png
from cadnode.core import audit
from cadnode.core.claims import processes
from cadnode.core.db import AuditEvent, AuditKind, AuditOutcome, Instance, Result, utcnow
from cadnode.core.yamlfile import ConfigError
from cadnode.deliver import outbox_admin as deliveries
from cadnode.dicom.pixels import ImageRefused
from cadnode.route.explain import Connection, explain, read_subjects
from cadnode.watch import agreement
from cadnode.watch.drift_listing import drift_table
from cadnode.watch.listing import active_alerts

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
DASHBOARD_ACTOR = "admin (dashboard)"
MODEL_CARD = "MODEL_CARD.md"
_PLOT = re.compile(r"^[A-Za-z0-9_.-]+\.png$")
# SQLite's integer primary keys are signed 64-bit: a larger id cannot name a row.
MAX_ROW_ID = 2**63 - 1


def context_of(request: Request) -> AdminContext:
    return request.app.state.context  # type: ignore[no-any-return]


def gate_of(request: Request) -> Gate:
    return request.app.state.gate  # type: ignore[no-any-return]


def row_id(text: str, what: str) -> int:
    """An id from the path: any that cannot name a row (too large, not a number) is 404."""
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 19 else 0
    if not 1 <= value <= MAX_ROW_ID:
        raise HTTPException(404, f"no {what} {text[:40]}")
    return value


def logged_in(request: Request) -> None:
    gate_of(request).page(request)


async def csrf_checked(request: Request) -> None:
    form = await request.form()
    gate_of(request).check_csrf(request, form.get("csrf"))


Page = Depends(logged_in)
router = APIRouter()
pages = APIRouter(dependencies=[Page])
actions = APIRouter(dependencies=[Page, Depends(csrf_checked)])


def render(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    values.setdefault("active", template.removesuffix(".html"))
    if values["active"] != "login":  # the watchdogs' banner, for those logged in only
        with context_of(request).database.session() as session:
            values.setdefault("alerts", active_alerts(session))
    # Deliveries name their destination; the table shows its configured address beside.
    values.setdefault("destinations", context_of(request).settings.destinations)
    return TEMPLATES.TemplateResponse(
        request,
        template,
        {"csrf": gate_of(request).csrf_token(request), **values},
        status_code=status_code,
    )


# -- login ----------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/studies") -> HTMLResponse:
    return render(request, "login.html", next=_local(next), enabled=gate_of(request).enabled)


@router.post("/login", response_model=None)
async def login(
    request: Request,
    password: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/studies",
) -> Response:
    gate = gate_of(request)
    gate.check_csrf(request, csrf)
    address = client_address(request.scope)
    # Off the event loop, a few at once, limited per address; failures are audited there.
    verdict = await gate.check_password(address, password)
    if not verdict.ok:
        return _login_refused(request, verdict, next)
    gate.start_session(request)
    await run_in_threadpool(
        audit.record,
        context_of(request).database,
        AuditKind.admin_login,
        actor="admin",
        address=address,
        outcome=AuditOutcome.ok,
    )
    return RedirectResponse(_local(next), status_code=303)


LOGIN_REFUSALS = {
    Outcome.wrong: (401, "Wrong password."),
    Outcome.locked_out: (
        429,
        "Too many failed logins from this address: try again in {0.retry_after_s} s.",
    ),
    Outcome.busy: (503, "The server is busy checking other logins: try again in a moment."),
}


def _login_refused(request: Request, verdict: Verdict, next: str) -> HTMLResponse:
    status, error = LOGIN_REFUSALS[verdict.outcome]
    answer = render(
        request,
        "login.html",
        status,
        next=_local(next),
        enabled=gate_of(request).enabled,
        error=error.format(verdict),
    )
    if verdict.retry_after_s:
        answer.headers["Retry-After"] = str(verdict.retry_after_s)
    return answer


@actions.post("/logout")
def logout(request: Request) -> RedirectResponse:
    gate_of(request).log_out(request)
    audit.record(
        context_of(request).database,
        AuditKind.admin_logout,
        actor="admin",
        address=request.client.host if request.client else None,
        outcome=AuditOutcome.ok,
    )
    return RedirectResponse("/login", status_code=303)


def _local(target: str) -> str:
    """Only a path on this server: a login must not bounce the browser elsewhere."""
    return target if target.startswith("/") and not target.startswith("//") else "/studies"


# -- studies --------------------------------------------------------------------------------


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/studies", status_code=303)


@pages.get("/studies", response_class=HTMLResponse)
def studies(request: Request) -> HTMLResponse:
    with context_of(request).database.session() as session:
        rows = data.job_rows(session)
    return render(request, "studies.html", rows=rows, stages=data.STAGE_NAMES)


@pages.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, note: str | None = None) -> HTMLResponse:
    context = context_of(request)
    with context.database.session() as session:
        detail = data.job_detail(session, row_id(job_id, "job"))
        # The radiologist's conclusions beside the engines' (cadnode.admin.feedback_pages).
        feedback = None if detail is None else job_feedback(
            session, row_id(job_id, "job"), context.settings.feedback
        )
    if detail is None:
        raise HTTPException(404, f"no job {job_id}")
    return render(
        request, "job.html", detail=detail, active="studies", feedback=feedback, note=note
    )


@pages.get("/results/{result_id}/overlay.png")
def result_overlay(request: Request, result_id: str) -> Response:
    context = context_of(request)
    with context.database.session() as session:
        result = session.get(Result, row_id(result_id, "result"))
        source = None if result is None else session.get(Instance, result.sop_instance_uid)
    if result is None or source is None:
        raise HTTPException(404, f"no result {result_id}, or its image is gone")
    storage = context.settings.storage
    limit = context.settings.limits.max_decoded_image_bytes
    try:
        png = overlay_png(storage.spool / source.path, result.answer, storage.answers, limit=limit)
    except ImageRefused as refused:  # the image, not the request: say so rather than a 500
        raise HTTPException(422, str(refused)) from refused
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


# -- queues and failures --------------------------------------------------------------------


@pages.get("/queues", response_class=HTMLResponse)
def queues(request: Request, note: str | None = None) -> HTMLResponse:
    context = context_of(request)
    with context.database.session() as session:
        found = data.failures(session)
        nodes = processes(session, context.settings.node)  # every node sharing the database
    return render(request, "queues.html", failures=found, nodes=nodes, note=note)


@actions.post("/deliveries/{delivery_id}/retry")
def retry_delivery(request: Request, delivery_id: str) -> RedirectResponse:
    ids = [row_id(delivery_id, "delivery")]
    [outcome] = deliveries.retry(context_of(request).database, ids, DASHBOARD_ACTOR)
    return RedirectResponse(f"/queues?note={outcome.line()}", status_code=303)


@actions.post("/deliveries/{delivery_id}/discard")
def discard_delivery(request: Request, delivery_id: str) -> RedirectResponse:
    ids = [row_id(delivery_id, "delivery")]
    [outcome] = deliveries.discard(context_of(request).database, ids, DASHBOARD_ACTOR)
    return RedirectResponse(f"/queues?note={outcome.line()}", status_code=303)


# -- rules ----------------------------------------------------------------------------------


@pages.get("/rules", response_class=HTMLResponse)
def rules_page(request: Request) -> HTMLResponse:
    return _rules(request)


@actions.post("/rules/explain", response_class=HTMLResponse)
async def rules_explain(
    request: Request,
    file: Annotated[UploadFile, File()],
    calling_ae: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """`cadnode rules explain` for an uploaded file, against the rules in force."""
    context = context_of(request)
    # The guard held the whole body to this already; the file alone cannot be larger.
    limit_mb = context.settings.http.max_upload_mb
    body = await file.read(int(limit_mb * 2**20) + 1)
    if len(body) > limit_mb * 2**20:
        return _rules(request, error=f"the file is over {limit_mb:g} MB")
    connection = Connection(calling_ae.strip() or None, context.settings.dicom.ae_title, None)
    with tempfile.TemporaryDirectory(prefix="cadnode-explain-") as folder:
        path = Path(folder) / "upload.dcm"
        path.write_bytes(body)
        try:
            subjects = read_subjects([path], connection)
        except ConfigError as error:
            name = file.filename or "the upload"
            return _rules(request, error=f"{name}: not a DICOM file ({error.problems[0]})")
        text = explain(context.rules(), subjects).replace(str(path), file.filename or "upload")
    return _rules(request, explanation=text, uploaded=file.filename)


def _rules(request: Request, **values: Any) -> HTMLResponse:
    rules = context_of(request).rules()
    source = rules.path.read_text() if rules.path and rules.path.exists() else ""
    return render(request, "rules.html", rules=rules, source=source, **values)


# -- engines --------------------------------------------------------------------------------


@pages.get("/engines", response_class=HTMLResponse)
def engines_page(request: Request) -> HTMLResponse:
    cards = {}
    for engine in context_of(request).engines:
        card = engine.folder / MODEL_CARD
        if card.exists():
            cards[engine.name] = _model_card(card.read_text(), engine.name)
    with context_of(request).database.session() as session:
        drift, drift_ok = drift_table(session)  # the last drift check's figures
    return render(
        request,
        "engines.html",
        engines=context_of(request).engines,
        cards=cards,
        drift=drift,
        drift_ok=drift_ok,
    )


def _model_card(text: str, engine: str) -> Markup:
    """The card as HTML, its plots (bundle-relative PNGs) served from /engines/NAME/."""
    html = markdown.markdown(text, extensions=["tables"], output_format="html")
    html = re.sub(
        r'<img([^>]*) src="([A-Za-z0-9_.-]+\.png)"',
        lambda m: f'<img{m[1]} src="/engines/{engine}/{m[2]}"',
        html,
    )
    return Markup(html)  # our own bundles' cards, as the engine's authors wrote them


@pages.get("/engines/{name}/{plot}")
def engine_plot(request: Request, name: str, plot: str) -> FileResponse:
    folders = {engine.name: engine.folder for engine in context_of(request).engines}
    if name not in folders or not _PLOT.match(plot) or not (folders[name] / plot).is_file():
        raise HTTPException(404, "no such plot")
    return FileResponse(folders[name] / plot, media_type="image/png")


# -- agreement, live against shadow (cadnode/watch/agreement.py) ----------------------------


@pages.get("/agreement/{name}", response_class=HTMLResponse)
def agreement_page(request: Request, name: str, since: str = "7d") -> HTMLResponse:
    try:
        window = agreement.window(since)
    except argparse.ArgumentTypeError as error:
        raise HTTPException(400, f"since: {error}") from error
    context = context_of(request)
    found = agreement.comparisons(
        context.database, name, utcnow() - window, answers=context.settings.storage.answers
    )
    shown = [(one, _agreement_charts(one)) for one in found.pairs]
    return render(
        request,
        "agreement.html",
        active="engines",
        engine=name,
        since=since,
        found=found,
        shown=shown,
        most=agreement.MAX_PAIRS,
    )


def _agreement_charts(one: agreement.Comparison) -> list[tuple[str, Markup]]:
    """(caption, chart): per day, agreement and kappa at each operating point (a
    segmenter: mean Dice per label); the histogram of probability differences."""
    days = agreement.by_day(one.figures)
    points = sorted({point for _, day in days for point in day.points})
    labels = sorted({label for _, day in days for label in day.dice})
    made = []
    for caption, series in (
        (
            "Agreement per day (UTC), by operating point",
            {p: [_bar(day.points.get(p), "agreement") for _, day in days] for p in points},
        ),
        (
            "Cohen's kappa per day (UTC), by operating point (undefined or below 0: drawn 0)",
            {p: [_bar(day.points.get(p), "kappa") for _, day in days] for p in points},
        ),
        (
            "Mean Dice per day (UTC), by label (both empty: 1)",
            {label: [_bar(day.dice.get(label), "mean") for _, day in days] for label in labels},
        ),
    ):
        if series:
            groups = [
                (day.strftime("%m-%d"), [values[i] for values in series.values()])
                for i, (day, _) in enumerate(days)
            ]
            chart = charts.grouped_bar_chart(groups, series=list(series), title=caption)
            made.append((caption, chart))
    if one.summary.probability is not None:
        caption = "Probability difference, shadow minus live (bins of 0.05, by lower edge)"
        histogram = agreement.difference_histogram(one.figures)
        made.append((caption, charts.bar_chart(histogram, title=caption, every_nth_label=4)))
    return made


def _bar(found: object | None, figure: str) -> float:
    """A figure as a bar: 0 where there is none, and where it is below 0 (a kappa)."""
    value = None if found is None else getattr(found, figure)
    return max(value or 0.0, 0.0)


# -- charts and audit -----------------------------------------------------------------------


@pages.get("/charts", response_class=HTMLResponse)
def charts_page(request: Request) -> HTMLResponse:
    with context_of(request).database.session() as session:
        hourly = data.studies_per_hour(session)
        percentiles = data.latency_percentiles(session)
    studies_chart = charts.bar_chart(
        [(charts.hour_label(hour), count) for hour, count in hourly],
        title="Studies received per hour (UTC), last 24 hours",
        every_nth_label=3,
    )
    stages = [stage for stage in data.STAGE_NAMES if stage in percentiles]
    latency_chart = charts.grouped_bar_chart(
        [(stage, [percentiles[stage][p] for p in ("p50", "p90", "p99")]) for stage in stages],
        series=["p50", "p90", "p99"],
        title="Seconds per stage: percentiles over all jobs",
        unit=" s",
    )
    return render(
        request,
        "charts.html",
        studies_chart=studies_chart,
        latency_chart=latency_chart,
        percentiles=percentiles,
        stages=stages,
    )


@pages.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, kind: str | None = None) -> HTMLResponse:
    with context_of(request).database.session() as session:
        query = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(200)
        if kind:
            query = query.where(col(AuditEvent.kind).in_(audit.kinds_starting(kind)))
        events = list(session.exec(query))
    return render(request, "audit.html", events=events, kind=kind or "")


router.include_router(pages)
router.include_router(actions)
