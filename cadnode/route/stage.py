"""The route stage: a complete study's job goes where the rules in force say.

A job moves from complete to routed (engines to run), to encoded (only originals to
forward: the dispatcher delivers them and settles the job), or to ignored (stored, not
processed). Either way it records the rules that fired, the rules' version, the priority
class and the quiet period the rules asked for. Forwarded originals are queued in the
outbox (cadnode/deliver/outbox.py) in the same commit as the transition, so they are
queued exactly when the decision is.

Earlier, while a study still arrives, route records on its job the quiet period the rules
ask for, from its first instance (`Job.quiet_period_s`, `quiet_period_decided_at`): assemble
reads it there to know when the study is complete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog
from pydicom import dcmread
from sqlalchemy import update
from sqlmodel import Session, col, select

from cadnode.core.claims import worker_for
from cadnode.core.config import AnyDestination
from cadnode.core.db import Database, FailureKind, Instance, Job, JobState, utcnow
from cadnode.deliver.outbox import queue_delivery
from cadnode.infer import releases
from cadnode.route.live import LiveRules
from cadnode.route.rules import Decision
from cadnode.route.steps import Step
from cadnode.route.values import Subject

log = structlog.get_logger("cadnode.route")

# Jobs claimed at once: few, so that other workers share a burst.
CLAIM_BATCH = 16


class Router:
    name = "route"

    def __init__(
        self,
        database: Database,
        spool: Path,
        rules: LiveRules,
        destinations: Mapping[str, AnyDestination] | None = None,
        versions: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """`versions`: the installed versions of each engine, by name; with them, each step
        is written with the versions the release table (or its rule) says run."""
        self.database = database
        self.spool = spool
        self.rules = rules
        self.versions = versions
        self.destinations = dict(destinations or {})
        self.worker = worker_for(database)  # claims each job before routing it

    def advance(self) -> float | None:
        with self.database.session() as session:
            if self._record_quiet_periods(session):
                self.database.on_change()  # assemble reads them
            while jobs := self.worker.claim(
                session, Job, col(Job.state) == JobState.complete, limit=CLAIM_BATCH
            ):
                for job in jobs:
                    self._route(session, job)
        return None

    def _record_quiet_periods(self, session: Session) -> int:
        """For each study still arriving whose quiet period is not decided yet: the one the
        rules ask for, from its first instance (None: assemble's default), on its job.
        Each job's first header is read once, here, never on assemble's every wake-up."""
        undecided = session.exec(
            select(Job)
            .where(Job.state == JobState.received, col(Job.quiet_period_decided_at).is_(None))
            .order_by(col(Job.id))
        ).all()
        recorded = 0
        for job in undecided:
            first = session.exec(
                select(Instance)
                .where(Instance.job_id == job.id)
                .order_by(col(Instance.received_at))
            ).first()
            if first is None:
                continue
            try:
                period = self.rules.current.quiet_period_for([self._subject(first)])
            except Exception as error:  # routing will fail the job; meanwhile, the default
                log.warning("route.quiet_period_unread", job=job.id, error=type(error).__name__)
                period = None
            moved = session.execute(
                update(Job)
                .where(
                    col(Job.id) == job.id,
                    col(Job.state) == JobState.received,
                    col(Job.quiet_period_decided_at).is_(None),
                )
                .values(quiet_period_s=period, quiet_period_decided_at=utcnow())
            )
            session.commit()
            recorded += moved.rowcount  # type: ignore[attr-defined]
        return recorded

    def _route(self, session: Session, job: Job) -> None:
        rules = self.rules.current  # one version decides the whole job, even mid-reload
        instances = session.exec(select(Instance).where(Instance.job_id == job.id)).all()
        try:
            subjects = [self._subject(instance) for instance in instances]
        except Exception as error:  # a stored file that no longer reads is a failed job
            self.worker.transition(
                session,
                job,
                JobState.failed,
                expect=JobState.complete,
                reason=f"cannot read stored instance: {error}",
                failure=FailureKind.unreadable,
            )
            return
        decision = rules.decide(subjects)
        recorded = {
            "rules_version": rules.version,
            "rule": ", ".join(decision.rule_names) or None,
            "priority": decision.priority,
            "quiet_period_s": decision.quiet_period_s,
        }
        if not decision.acts:
            reason = _why_ignored(decision.rule_names)
            self.worker.transition(
                session, job, JobState.ignored, expect=JobState.complete, reason=reason, **recorded
            )
            return
        self._forward(session, job, decision)
        steps = self._versioned(session, decision.steps())
        if not steps:  # nothing to infer: the originals are what gets delivered
            destinations = sorted({name for _, name in decision.forwards()})
            self.worker.transition(
                session,
                job,
                JobState.encoded,
                expect=JobState.complete,
                reason=f"forwarded to {', '.join(destinations)}; no engines to run",
                **recorded,
            )
            return
        self.worker.transition(
            session,
            job,
            JobState.routed,
            expect=JobState.complete,
            pipeline=[step.model_dump(mode="json", exclude_defaults=True) for step in steps],
            inputs=decision.inputs,
            **recorded,
        )

    def _versioned(self, session: Session, steps: list[Step]) -> list[Step]:
        """Each step with the versions that run it, read now: a promotion holds for the jobs
        routed after it, and a routed job keeps its versions."""
        if self.versions is None:
            return steps
        chosen = []
        for step in steps:
            installed = self.versions.get(step.engine)
            if not installed:
                chosen.append(step)
                continue
            release = releases.resolve(session, step.engine, installed)
            version = step.version or release.live
            shadow = release.shadows if step.shadow is None else step.shadow
            update = {"version": version, "shadow": [v for v in shadow if v != version]}
            chosen.append(step.model_copy(update=update))
        return chosen

    def _subject(self, instance: Instance) -> Subject:
        return Subject(
            header=dcmread(self.spool / instance.path, stop_before_pixels=True),
            calling_ae=instance.calling_ae,
            called_ae=instance.called_ae or None,
            source_address=instance.peer.rsplit(":", 1)[0] or None,
            label=instance.sop_instance_uid,
        )

    def _forward(self, session: Session, job: Job, decision: Decision) -> None:
        assert job.id is not None
        for uid, name in decision.forwards():
            queue_delivery(session, job.id, uid, name)  # the row names its destination


def _why_ignored(fired: list[str]) -> str:
    if not fired:
        return "no rule matched"
    if len(fired) == 1:
        return f"rule {fired[0]!r} ignores it"
    return f"rules {', '.join(map(repr, fired))} ignore it"
