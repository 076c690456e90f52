"""Radiologists' conclusions as ground truth: what was found, arriving from outside.

Three ways in, all ending as Feedback rows linked to the study's job (cadnode.feedback.record):
the final report as HL7 v2 ORU^R01 over MLLP (`mllp`, `oru`), labelled per finding by
NegEx-style rules (`negation`, `labels`, config/feedback.yaml); an admin's agree / disagree
on the dashboard (cadnode.admin.feedback_pages); a RIS's POST /api/feedback (`api`).
cadnode.watch.performance measures the engines against them.
"""

from __future__ import annotations

from cadnode.core.config import FeedbackSettings
from cadnode.core.db import Database
from cadnode.feedback.labels import ReportReader, rules_at
from cadnode.feedback.mllp import ReportListener

__all__ = ["ReportListener", "report_listener"]


def report_listener(settings: FeedbackSettings, database: Database) -> ReportListener | None:
    """The MLLP listener `feedback.mllp` asks for (None when disabled), its findings file
    read and checked now (ConfigError naming file:line), disabled or not."""
    rules = rules_at(settings.findings_file)
    if not settings.mllp.enabled:
        return None
    return ReportListener(settings.mllp, database, ReportReader(rules))
