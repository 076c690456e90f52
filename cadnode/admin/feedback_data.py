"""What the dashboard shows of the radiologists' feedback: a job's conclusions beside what
each engine said (the study page's agree / disagree), and the performance figures."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from cadnode.core.config import FeedbackSettings
from cadnode.core.db import Conclusion, Feedback, Result, utcnow
from cadnode.feedback.labels import FeedbackRules, rules_at
from cadnode.feedback.record import conclusions_of
from cadnode.infer.answers import parse_answer
from cadnode.watch.performance import Figures, Key, by_week, read_cases, tabulate


@dataclass(frozen=True)
class EngineSaid:
    """What one engine version said about one finding of the job (any image, any point)."""

    engine: str
    version: str
    finding: str
    positive: bool

    def conclusion(self, agree: bool) -> Conclusion:
        """The radiologist's conclusion when they agree with it, or disagree."""
        return Conclusion.present if self.positive == agree else Conclusion.absent


@dataclass
class JobFeedback:
    findings: list[str]  # every finding one may name (config/feedback.yaml)
    said: list[EngineSaid]
    conclusions: list[Feedback] = field(default_factory=list)


def job_feedback(session: Session, job_id: int, settings: FeedbackSettings) -> JobFeedback:
    rules = rules_at(settings.findings_file)
    # The live versions' answers only: a shadow version's are not shown as results (the
    # conclusion recorded measures it all the same).
    results = session.exec(
        select(Result).where(Result.job_id == job_id, col(Result.shadow).is_(False))
    ).all()
    said: dict[tuple[str, str, str], EngineSaid] = {}
    for result in results:
        for finding, positive in _findings_said(result, rules):
            key = (result.engine, result.engine_version, finding)
            earlier = said.get(key)
            said[key] = EngineSaid(
                result.engine,
                result.engine_version,
                finding,
                positive or (earlier is not None and earlier.positive),
            )
    return JobFeedback(
        findings=list(rules.findings),
        said=[said[key] for key in sorted(said)],
        conclusions=conclusions_of(session, job_id),
    )


def _findings_said(result: Result, rules: FeedbackRules) -> list[tuple[str, bool]]:
    found = []
    for statement in parse_answer(result.answer).statements():
        finding = rules.finding_of(statement.label)
        if finding is not None:
            found.append((finding, statement.reached))
    return found


@dataclass
class Performance:
    since: dt.datetime
    table: dict[Key, Figures]
    weekly: dict[Key, dict[dt.date, Figures]]
    conclusions: int  # cases read (studies x findings x operating points)


def performance(session: Session, settings: FeedbackSettings) -> Performance:
    since = utcnow() - dt.timedelta(seconds=settings.window)
    cases = read_cases(
        session, rules_at(settings.findings_file), since=since, max_rows=settings.max_rows
    )
    return Performance(since, tabulate(cases), by_week(cases), len(cases))
