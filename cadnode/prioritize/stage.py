"""Prioritize: set each study's worklist priority, at arrival and whenever results come.

A study is MEDIUM (the policy's `no_result`) from the moment it arrives, with a UPS workitem
on the worklist. Each job version that settles (results, failure, or no engine for it) is
decided again by the policy over everything the study's versions have answered. Every
decision is recorded; a change updates the workitem and queues its publications (UPS event
reports, UPS push, HL7, webhooks) in the same commit.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import structlog
from pydantic import ValidationError
from sqlalchemy import exists
from sqlmodel import Session, col, select

from cadnode.core.config import PrioritySettings
from cadnode.core.db import (
    Database,
    Instance,
    Job,
    JobState,
    PublicationChannel,
    Result,
    Study,
    StudyPriority,
    Workitem,
)
from cadnode.deliver.outbox import queue_publication
from cadnode.infer.answers import parse_answer
from cadnode.prioritize import worklist
from cadnode.prioritize.policy import Decision, EngineResult, Policy, StudyOutcome
from cadnode.prioritize.worklist import STATE_REPORT

log = structlog.get_logger("cadnode.prioritize")

# A job version in one of these states has said all it will say about its images.
SETTLED = (
    JobState.inferred,
    JobState.encoded,
    JobState.delivered,
    JobState.failed,
    JobState.ignored,
)


class Prioritizer:
    name = "prioritize"

    def __init__(
        self,
        database: Database,
        spool: Path,
        policy: Policy,
        settings: PrioritySettings,
        retrieve_ae: str,
    ) -> None:
        self.database = database
        self.spool = spool
        self.policy = policy
        self.settings = settings
        self.retrieve_ae = retrieve_ae

    def advance(self) -> float | None:
        decided = 0
        with self.database.session() as session:
            for study in self._arrived(session):
                decided += self._try(session, study.id, None, self.policy.arrival)
            for job in self._settled(session):
                decide = partial(self.policy.decide, _outcome(session, job.study_id))
                decided += self._try(session, job.study_id, job, decide)
        if decided:
            self.database.on_change()  # wakes the publish stage
        return None

    def _try(
        self,
        session: Session,
        study_id: int | None,
        job: Job | None,
        decide: Callable[[], Decision],
    ) -> int:
        """One study's trouble (say, an image gone from the spool) must not stall the others."""
        try:
            return self._decide(session, study_id, job, decide())
        except Exception:
            session.rollback()
            log.exception("study.priority_not_set", study=study_id, job=job.id if job else None)
            return 0

    def _arrived(self, session: Session) -> list[Study]:
        """Studies without any decision yet."""
        undecided = ~exists().where(col(StudyPriority.study_id) == col(Study.id))
        return list(session.exec(select(Study).where(undecided).order_by(col(Study.id))))

    def _settled(self, session: Session) -> list[Job]:
        """Settled job versions not decided on yet."""
        undecided = ~exists().where(col(StudyPriority.job_id) == col(Job.id))
        return list(
            session.exec(
                select(Job).where(col(Job.state).in_(SETTLED), undecided).order_by(col(Job.id))
            )
        )

    def _decide(
        self, session: Session, study_id: int | None, job: Job | None, decision: Decision
    ) -> int:
        assert study_id is not None
        with worklist.lock(self.database):
            session.commit()  # what the lock's last holder committed, not an older snapshot
            if _decided(session, study_id, job):  # by another node, since it was read
                return 0
            current = _current(session, study_id)
            changed = current is None or current.level != decision.level
            row = StudyPriority(
                study_id=study_id,
                job_id=job.id if job else None,
                level=decision.level,
                reason=decision.reason,
                rule=decision.rule,
                changed=changed,
            )
            session.add(row)
            session.flush()
            ready = job is not None or _any_job_past_received(session, study_id)
            self._update_workitem(session, row, ready, changed)
            if changed:
                self._queue_publications(session, row, first=current is None)
            session.commit()
        log.info(
            "study.prioritized",
            study=study_id,
            job=row.job_id,
            priority=row.level.value,
            previous=current.level.value if current else None,
            rule=row.rule,
            changed=changed,
            policy_version=self.policy.version,
        )
        return 1

    def _update_workitem(
        self, session: Session, decision: StudyPriority, ready: bool, changed: bool
    ) -> None:
        item = worklist.workitem_of_study(session, decision.study_id)
        instances = _instances(session, decision.study_id)
        if item is None:
            self._create_workitem(session, decision, instances, ready)
            return
        if item.state.final:
            return  # read already (or canceled): the record keeps the decision, the item stays
        ds = worklist.dataset_of(item)
        readiness = "READY" if ready else "INCOMPLETE"
        readiness_changed = ds.InputReadinessState != readiness
        ds.InputReadinessState = readiness
        worklist.reprioritize(ds, decision.level, self.settings.ups.turnaround)
        ds.CommentsOnTheScheduledProcedureStep = decision.reason[:10240]
        # From the rows alone: reading an image again would cost more than the rest.
        ds.InputInformationSequence = worklist.input_information(
            _study_uid(session, decision.study_id), instances, self.retrieve_ae
        )
        worklist.keep(session, item, ds)
        if changed or readiness_changed:
            report = worklist.state_report(ds)
            worklist.queue_event(session, item, STATE_REPORT, report, decision_id=decision.id)

    def _create_workitem(
        self, session: Session, decision: StudyPriority, instances: list[Instance], ready: bool
    ) -> None:
        header = worklist.workitem_source(self.spool / instances[0].path)
        uid = worklist.workitem_uid(_study_uid(session, decision.study_id))
        ds = worklist.build_workitem(
            uid,
            header,
            instances,
            priority=decision.level,
            reason=decision.reason,
            worklist_label=self.settings.ups.worklist_label,
            turnaround=self.settings.ups.turnaround,
            retrieve_ae=self.retrieve_ae,
            ready=ready,
        )
        item = Workitem(sop_instance_uid=uid, study_id=decision.study_id, priority=decision.level)
        worklist.keep(session, item, ds)
        session.flush()
        # A new UPS: its State Report goes to the global subscribers (PS3.4 CC.2.4.3).
        report = worklist.state_report(ds)
        worklist.queue_event(session, item, STATE_REPORT, report, decision_id=decision.id)

    def _queue_publications(self, session: Session, decision: StudyPriority, first: bool) -> None:
        """The decision for every configured recipient; one of theirs still waiting is
        superseded (a RIS must end with the newest priority, not walk through stale ones)."""

        def queue(channel: PublicationChannel, name: str) -> None:
            queue_publication(
                session,
                decision.study_id,
                channel,
                name,
                decision_id=decision.id,
                supersede=True,
            )

        for name in self.settings.ups.push:  # the external worklist needs the item from arrival
            queue(PublicationChannel.ups_push, name)
        if first and not self.settings.publish_arrival:
            return
        for name, hl7 in self.settings.hl7.items():
            if hl7.enabled:
                queue(PublicationChannel.hl7, name)
        for name, webhook in self.settings.webhooks.items():
            if webhook.enabled:
                queue(PublicationChannel.webhook, name)


def _outcome(session: Session, study_id: int) -> StudyOutcome:
    """What every settled version of the study has answered, and what it could not."""
    jobs = session.exec(
        select(Job).where(Job.study_id == study_id, col(Job.state).in_(SETTLED))
    ).all()
    outcome = StudyOutcome()
    for job in jobs:
        results = session.exec(  # a shadow version's answers never move a study
            select(Result).where(Result.job_id == job.id, col(Result.shadow).is_(False))
        ).all()
        for result in results:
            try:
                outcome.results.append(EngineResult(result.engine, parse_answer(result.answer)))
            except ValidationError as error:  # never lowered on an answer it cannot read
                count = error.error_count()
                outcome.unanswered.append(f"{result.engine}: answer unreadable ({count} errors)")
        if not results:
            outcome.unanswered.append(job.reason or job.state.value)
            outcome.failed |= job.state is JobState.failed
    return outcome


def _study_uid(session: Session, study_id: int) -> str:
    study = session.get(Study, study_id)
    assert study is not None
    return study.study_uid


def _current(session: Session, study_id: int) -> StudyPriority | None:
    return session.exec(
        select(StudyPriority)
        .where(StudyPriority.study_id == study_id)
        .order_by(col(StudyPriority.id).desc())
    ).first()


def _instances(session: Session, study_id: int) -> list[Instance]:
    return list(
        session.exec(
            select(Instance)
            .join(Job)
            .where(Job.study_id == study_id)
            .order_by(col(Instance.received_at))
        )
    )


def _any_job_past_received(session: Session, study_id: int) -> bool:
    return (
        session.exec(
            select(Job.id).where(Job.study_id == study_id, Job.state != JobState.received)
        ).first()
        is not None
    )


def _decided(session: Session, study_id: int, job: Job | None) -> bool:
    """Whether this decision is made already: the job's, or the study's at arrival."""
    made = (
        col(StudyPriority.job_id) == job.id
        if job is not None
        else col(StudyPriority.study_id) == study_id
    )
    return session.exec(select(StudyPriority.id).where(made)).first() is not None
