"""The route stage: a complete study's job goes where the rules in force say.

A job moves from complete to routed (engines to run), to encoded (only originals to
forward: the dispatcher delivers them and settles the job), or to ignored (stored, not
processed). Either way it records the rules that fired, the rules' version, the priority
class and the quiet period the rules asked for. Forwarded originals are Delivery rows in
the same commit as the transition, so they are queued exactly when the decision is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydicom import dcmread
from sqlmodel import Session, select

from cadnode.core.config import Destination
from cadnode.core.db import Database, Delivery, Instance, Job, JobState
from cadnode.route.live import LiveRules
from cadnode.route.rules import Decision
from cadnode.route.values import Subject


class Router:
    name = "route"

    def __init__(
        self,
        database: Database,
        spool: Path,
        rules: LiveRules,
        destinations: Mapping[str, Destination] | None = None,
    ) -> None:
        self.database = database
        self.spool = spool
        self.rules = rules
        self.destinations = dict(destinations or {})
        self._first_subjects: dict[int | None, Subject] = {}

    def advance(self) -> float | None:
        with self.database.session() as session:
            for job in self.database.jobs_in(session, JobState.complete):
                self._route(session, job)
        return None

    def _route(self, session: Session, job: Job) -> None:
        rules = self.rules.current  # one version decides the whole job, even mid-reload
        instances = session.exec(select(Instance).where(Instance.job_id == job.id)).all()
        try:
            subjects = [self._subject(instance) for instance in instances]
        except Exception as error:  # a stored file that no longer reads is a failed job
            self.database.transition(
                session,
                job,
                JobState.failed,
                expect=JobState.complete,
                reason=f"cannot read stored instance: {error}",
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
            self.database.transition(
                session, job, JobState.ignored, expect=JobState.complete, reason=reason, **recorded
            )
            return
        session.add_all(self._forwards(job, decision))
        steps = decision.steps()
        if not steps:  # nothing to infer: the originals are what gets delivered
            destinations = sorted({name for _, name in decision.forwards()})
            self.database.transition(
                session,
                job,
                JobState.encoded,
                expect=JobState.complete,
                reason=f"forwarded to {', '.join(destinations)}; no engines to run",
                **recorded,
            )
            return
        self.database.transition(
            session,
            job,
            JobState.routed,
            expect=JobState.complete,
            pipeline=[step.model_dump(mode="json", exclude_defaults=True) for step in steps],
            inputs=decision.inputs,
            **recorded,
        )

    def quiet_period_for(self, session: Session, job: Job) -> float | None:
        """The quiet period the rules ask for a study still arriving, or None for the default.

        Decided on the study's first instance, read once per job: assemble asks on every
        wake-up, and reading every header each time would slow ingest.
        """
        if job.id not in self._first_subjects:
            first = session.exec(
                select(Instance).where(Instance.job_id == job.id).order_by(Instance.received_at)  # type: ignore[arg-type]
            ).first()
            if first is None:
                return None
            if len(self._first_subjects) > 10_000:  # jobs long released: forget them
                self._first_subjects.clear()
            self._first_subjects[job.id] = self._subject(first)
        return self.rules.current.quiet_period_for([self._first_subjects[job.id]])

    def _subject(self, instance: Instance) -> Subject:
        return Subject(
            header=dcmread(self.spool / instance.path, stop_before_pixels=True),
            calling_ae=instance.calling_ae,
            called_ae=instance.called_ae or None,
            source_address=instance.peer.rsplit(":", 1)[0] or None,
            label=instance.sop_instance_uid,
        )

    def _forwards(self, job: Job, decision: Decision) -> list[Delivery]:
        assert job.id is not None
        return [
            Delivery(object_uid=uid, job_id=job.id, destination=str(self.destinations[name]))
            for uid, name in decision.forwards()
        ]


def _why_ignored(fired: list[str]) -> str:
    if not fired:
        return "no rule matched"
    if len(fired) == 1:
        return f"rule {fired[0]!r} ignores it"
    return f"rules {', '.join(map(repr, fired))} ignore it"
