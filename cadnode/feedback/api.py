"""POST /api/feedback: a RIS says what the radiologist concluded, as JSON.

The guard (cadnode.admin.guard) has checked the bearer token (a `feedback.api_clients`
one, or the admin's) before a byte of the body is read, and holds the body to
`http.max_form_kb`; the body is then validated here (pydantic): the study by accession
number or Study Instance UID, and up to MAX_FINDINGS findings named as config/feedback.yaml
names them. Answers: 201 with the job, 404 when no study held matches, 422 naming what is
wrong.

    {"accession_number": "ACC123", "report_id": "R-77",
     "findings": [{"finding": "pneumothorax", "conclusion": "present"}]}
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cadnode.admin.auth import API_CLIENT, client_address
from cadnode.admin.context import AdminContext
from cadnode.core.db import Conclusion, FeedbackSource
from cadnode.feedback.labels import rules_at
from cadnode.feedback.record import Said, find_target, keep

MAX_FINDINGS = 32
Identifier = Annotated[str, StringConstraints(max_length=64, pattern=r"^[\x20-\x7e]*$")]
Uid = Annotated[str, StringConstraints(max_length=64, pattern=r"^[0-9.]*$")]


class Finding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    finding: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    conclusion: Conclusion


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accession_number: Identifier = ""
    study_uid: Uid = ""
    report_id: Identifier = ""
    findings: list[Finding] = Field(min_length=1, max_length=MAX_FINDINGS)

    @model_validator(mode="after")
    def _names_a_study(self) -> FeedbackRequest:
        if not (self.accession_number.strip() or self.study_uid):
            raise ValueError("name the study: accession_number or study_uid")
        return self


def feedback_router(context: AdminContext) -> APIRouter:
    router = APIRouter()
    rules_file = context.settings.feedback.findings_file

    @router.post("/api/feedback", status_code=201)
    def post_feedback(request: Request, body: FeedbackRequest) -> dict[str, Any]:
        known = rules_at(rules_file).findings
        unknown = sorted({f.finding for f in body.findings} - set(known))
        if unknown:
            raise HTTPException(
                422, f"unknown findings {unknown}: config/feedback.yaml has {sorted(known)}"
            )
        with context.database.session() as session:
            target = find_target(
                session, accession=body.accession_number.strip(), study_uid=body.study_uid
            )
        if target is None:
            raise HTTPException(404, "no study held with this accession number or study UID")
        client = str(getattr(request.state, API_CLIENT, "") or "api")
        rows = keep(
            context.database,
            target,
            [Said(f.finding, f.conclusion) for f in body.findings],
            source=FeedbackSource.api,
            author=client,
            report_id=body.report_id or body.accession_number,
            address=client_address(request.scope),
        )
        return {"job_id": target.job_id, "stored": len(rows)}

    return router
