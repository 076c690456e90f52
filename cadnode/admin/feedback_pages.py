"""The dashboard's radiologist feedback: agree / disagree on a study's page, and the
performance page (sensitivity, specificity, PPV, NPV per engine version and operating point).

Behind the login like every page; the action carries the session's CSRF token, is open to
the dashboard's one role (the admin: the dashboard has no other), and is audited
(admin.feedback) with what was concluded.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from cadnode.admin.auth import client_address
from cadnode.admin.feedback_data import performance
from cadnode.admin.views import DASHBOARD_ACTOR, Page, context_of, csrf_checked, render, row_id
from cadnode.core.db import Conclusion, FeedbackSource
from cadnode.feedback.labels import rules_at
from cadnode.feedback.record import Said, find_target, keep

router = APIRouter()
pages = APIRouter(dependencies=[Page])
actions = APIRouter(dependencies=[Page, Depends(csrf_checked)])


@actions.post("/jobs/{job_id}/feedback")
def post_feedback(
    request: Request,
    job_id: str,
    finding: Annotated[str, Form(max_length=64)],
    conclusion: Annotated[str, Form(max_length=16)],
) -> RedirectResponse:
    context = context_of(request)
    known = rules_at(context.settings.feedback.findings_file).findings
    if finding not in known or conclusion not in Conclusion.__members__:
        raise HTTPException(422, f"unknown finding {finding[:64]!r} or conclusion")
    with context.database.session() as session:
        target = find_target(session, job_id=row_id(job_id, "job"))
    if target is None:
        raise HTTPException(404, f"no job {job_id}")
    keep(
        context.database,
        target,
        [Said(finding, Conclusion(conclusion))],
        source=FeedbackSource.dashboard,
        author=DASHBOARD_ACTOR,
        address=client_address(request.scope),
    )
    note = quote(f"recorded: {finding} {conclusion}")
    return RedirectResponse(f"/jobs/{target.job_id}?note={note}#feedback", status_code=303)


@pages.get("/performance", response_class=HTMLResponse)
def performance_page(request: Request) -> HTMLResponse:
    context = context_of(request)
    with context.database.session() as session:
        figures = performance(session, context.settings.feedback)
    return render(request, "performance.html", performance=figures)


router.include_router(pages)
router.include_router(actions)
