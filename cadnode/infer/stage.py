"""Infer: run each routed job's pipeline of engines on its input images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlmodel import Session, select

from cadnode.db import Database, Instance, Job, JobState, PriorityClass, Result
from cadnode.infer.runtime import Engine
from cadnode.pipeline import Step

URGENCY = {PriorityClass.urgent: 0, PriorityClass.routine: 1, PriorityClass.background: 2}


class Inference:
    name = "infer"

    def __init__(self, database: Database, spool: Path, engines: dict[str, Engine]) -> None:
        self.database = database
        self.spool = spool
        self.engines = engines

    def advance(self) -> float | None:
        # One job at a time, the most urgent first, choosing again after each: an urgent
        # study waits for at most the engine call in progress, never for a queue.
        with self.database.session() as session:
            while (job := self._most_urgent(session)) is not None:
                self._infer(session, job)
        return None

    def _most_urgent(self, session: Session) -> Job | None:
        waiting = self.database.jobs_in(session, JobState.routed)
        return min(waiting, key=lambda job: (URGENCY[job.priority], job.id), default=None)

    def _infer(self, session: Session, job: Job) -> None:
        try:
            results = self._run_pipeline(session, job)
        except Exception as error:  # an engine fault fails this job, not the node
            self.database.transition(
                session,
                job,
                JobState.failed,
                expect=JobState.routed,
                reason=f"inference failed: {type(error).__name__}: {error}",
            )
            return
        assert job.id is not None
        session.add_all(results)
        self.database.transition(session, job, JobState.inferred, expect=JobState.routed)

    def _run_pipeline(self, session: Session, job: Job) -> list[Result]:
        assert job.id is not None
        instances = session.exec(
            select(Instance).where(Instance.sop_instance_uid.in_(job.inputs))  # type: ignore[attr-defined]
        ).all()
        images = {i.sop_instance_uid: dcmread(self.spool / i.path) for i in instances}
        answers: dict[tuple[str, str], dict[str, Any]] = {}  # (step's engine, image) -> answer
        results = []
        for step in map(Step.from_job, job.pipeline):
            # A step with a condition runs only on the images whose earlier answer passes it.
            chosen = [uid for uid in step.images(job.inputs, answers) if uid in images]
            if not chosen:
                continue
            engine = self.engines[step.engine]
            batch = [images[uid] for uid in chosen]
            for uid, answer in zip(chosen, engine.classify(batch), strict=True):
                answers[(step.engine, uid)] = answer
                results.append(
                    Result(
                        job_id=job.id,
                        engine=engine.name,
                        engine_version=engine.manifest.version,
                        model_sha256=engine.bundle.sha256,
                        sop_instance_uid=uid,
                        answer=answer,
                    )
                )
        return results
