"""Infer: run each routed job's pipeline of engines on its input images.

Engine calls run on a worker pool per engine, `engines.options.NAME.concurrency` workers
wide, never on the stage's own thread: a DBT volume on the detector does not hold up a chest
film on the rule-out engine. The stage chooses again after every engine call, the most urgent
job first (rule priority class, then arrival), so an urgent study waits at most for the call
in progress on its engine, never for a queue. A job's pipeline goes one step (one engine
call, on the images the step's condition lets through) at a time; the answers so far are
kept in memory and written with the job's move to `inferred`, so a restart redoes the job.

An attempt (the job's pipeline from its first step) is counted in the database when its
first call starts, before any image is decoded, so an image that kills the node is not
decoded forever: at the next start, an attempt counted but never ended (no retry time set)
is a failed one (so is one cut off by a stop that outlasted the conveyor's deadline). A call
that raises, or runs past its engine's `timeout_s`, fails that attempt: the job waits
`retry_backoff_s * 2**(attempts - 1)` (cadnode/core/backoff.py, the node's one retry
schedule) and runs again from its first step, until `engines.max_attempts`, when it fails
with the reason. An image refused by cadnode.dicom.pixels
(over `limits.max_decoded_image_mb`, or a codestream that disagrees with its dataset) fails
the job at once: the same bytes would be refused again. A thread stuck in a model call
cannot be killed: it is abandoned (its answer, if it ever comes, is dropped) and the engine
gets a fresh pool, so its later calls are not stuck behind it; the stuck thread keeps its
CPU (and Python waits for it at exit) until the call returns.

Each step runs the engine version route wrote into it (cadnode/infer/releases.py). A step's
shadow versions run later, apart: the job's move to inferred queues a ShadowRun per shadow
version on the images the live step ran on, and the stage takes one only when no live job
waits (claimed by a compare-and-set with a lease past its engine's timeout). Its answers are
stored `Result.shadow`; its failure or timeout ends the run, never the job.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydicom import dcmread
from sqlalchemy import and_, case, or_, update
from sqlmodel import Session, col, select

from cadnode.core.claims import worker_for
from cadnode.core.config import EngineSettings
from cadnode.core.db import (
    Database,
    FailureKind,
    Instance,
    Job,
    JobState,
    PriorityClass,
    Result,
    ShadowRun,
    ShadowRunState,
    Study,
    utcnow,
)
from cadnode.dicom.pixels import ImageRefused
from cadnode.infer import releases
from cadnode.infer.answers import Answer, dump_answer
from cadnode.infer.bundle import TaskKind
from cadnode.infer.profile import record_profiles
from cadnode.infer.runtime import Engine, engine_key
from cadnode.route.steps import Step

log = structlog.get_logger("cadnode.infer")

URGENCY = {PriorityClass.urgent: 0, PriorityClass.routine: 1, PriorityClass.background: 2}
# While engine calls run, how often the stage looks for newly routed jobs (an urgent film
# for an idle engine starts within this, not after the calls in progress).
POLL_S = 0.1
# A shadow run's lease: its engine's timeout and this much more (no renewal: a call past its
# timeout is abandoned, so a lease past it means the claimer is gone).
SHADOW_LEASE_SLACK_S = 60.0


@dataclass
class _Progress:
    """A job's pipeline part-way through: the next step and the answers so far."""

    step: int = 0
    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)  # (engine, UID)
    results: list[Result] = field(default_factory=list)
    shadow_runs: list[ShadowRun] = field(default_factory=list)  # queued with the move on
    counted: bool = False  # this attempt is in the job's attempts


@dataclass
class _Call:
    """One engine call in progress: one pipeline step of one job, or one shadow run."""

    job_id: int
    name: str  # the engine as the pipeline names it (an engine may be installed twice)
    key: str  # the loaded version's key in `Inference.engines`: its pool, its workers
    engine: Engine
    uids: list[str]
    future: Future[list[Answer]]
    started: float  # time.monotonic()
    shadows: tuple[str, ...] = ()  # versions to run in shadow on the same images after

    @property
    def deadline(self) -> float:
        return self.started + self.engine.options.timeout_s


class Inference:
    name = "infer"

    def __init__(
        self,
        database: Database,
        spool: Path,
        engines: dict[str, Engine],
        *,
        answers: Path | None = None,
        settings: EngineSettings | None = None,
    ) -> None:
        """`answers`: where segment masks are written (StorageSettings.answers); a segment
        engine's call fails without it."""
        self.database = database
        self.spool = spool
        self.engines = engines
        self.answers = answers
        self.settings = settings or EngineSettings()
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._calls: dict[int, _Call] = {}  # by job id
        self._shadow_calls: dict[int, _Call] = {}  # by shadow run id
        self._progress: dict[int, _Progress] = {}
        self._call_ended = threading.Event()
        # Each job is claimed before its attempt counts, and held until it moves on or waits
        # for a retry: no two workers run it. One claimed with an attempt counted and not
        # ended, yet not in progress here, was running where a process stopped (perhaps
        # killed by the image it decoded): that attempt failed; it is not replayed as new.
        self.worker = worker_for(database)

    def advance(self) -> float | None:
        """Start every call that can start, most urgent job first; collect them as they end
        and start the next; return when none is running (the seconds until a retry is due)."""
        while True:
            self._call_ended.clear()
            with self.database.session() as session:
                self._collect(session)
                self._collect_shadow(session)
                self._start_calls(session)
                self._start_shadow_runs(session)
                if not self._calls and not self._shadow_calls:
                    return self._retry_due_in(session)
            self._call_ended.wait(min(POLL_S, self._time_to_deadline()))

    @property
    def running(self) -> int:
        """Engine calls in progress, shadow ones too (abandoned ones not counted)."""
        return len(self._calls) + len(self._shadow_calls)

    def close(self) -> None:
        """Stop taking calls; those running finish in their threads, unwatched."""
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools.clear()

    # --- choosing and starting calls -------------------------------------------------------

    def _start_calls(self, session: Session) -> None:
        waiting = [job for job in self._claim(session) if job.id not in self._calls]
        for job in sorted(waiting, key=lambda job: (URGENCY[job.priority], job.id)):
            assert job.id is not None
            if job.id not in self._progress and job.attempts > 0 and job.next_attempt_at is None:
                self._attempt_failed(session, job.id, None, "the node stopped during this attempt")
                continue
            self._start_next_step(session, job)
        # Claimed but not begun (their engine busy): free for another worker meanwhile.
        begun = {job_id for job_id, progress in self._progress.items() if progress.counted}
        unstarted = [job.id for job in waiting if job.id not in self._calls.keys() | begun]
        for job_id in unstarted:
            self._progress.pop(job_id, None)  # type: ignore[arg-type]
        self.worker.release(session, Job, unstarted, col(Job.state) == JobState.routed)

    def _claim(self, session: Session) -> list[Job]:
        """The jobs this worker may start a call for now: those it holds part-way through,
        and as many more, most urgent first, as its engines have free workers."""
        free = sum(
            max(0, engine.options.concurrency - self._busy(name))
            for name, engine in self.engines.items()
        )
        if not free and self.engines:
            return []  # nothing can start before a call ends
        now = utcnow()
        urgency = case(
            *((col(Job.priority) == level, rank) for level, rank in URGENCY.items()), else_=9
        )
        return self.worker.claim(
            session,
            Job,
            col(Job.state) == JobState.routed,
            or_(col(Job.next_attempt_at).is_(None), col(Job.next_attempt_at) <= now),
            col(Job.id).not_in(list(self._calls)),  # held already; the renewer keeps them
            order_by=[urgency],
            limit=len(self._progress) + max(free, 1),
        )

    def _start_next_step(self, session: Session, job: Job) -> None:
        """Start the job's next engine call if its engine has a free worker; finish the job
        when no step is left."""
        assert job.id is not None
        progress = self._progress.setdefault(job.id, _Progress())
        steps = [Step.from_job(entry) for entry in job.pipeline]
        while progress.step < len(steps):
            step = steps[progress.step]
            chosen = step.images(job.inputs, progress.answers)
            if not chosen:  # the condition let no image through: the step is skipped
                progress.step += 1
                continue
            found = self._engine_for(session, step.engine, step.version)
            if found is None:
                missing = f"{step.engine} {step.version}" if step.version else step.engine
                self._fail(session, job, self._not_loaded(missing), FailureKind.engine_unavailable)
                return
            key, engine = found
            if self._busy(key) < engine.options.concurrency:
                self._submit(session, job, step.engine, key, chosen, tuple(step.shadow or ()))
            return
        self._finish(session, job, progress)

    def _engine_for(
        self, session: Session, name: str, version: str | None
    ) -> tuple[str, Engine] | None:
        """The loaded engine for a step, and its key: the version the job was routed with;
        with none recorded, the live one (the release table's, among those loaded here). An
        engine loaded under the step's own name (one version, as tests load them) is it."""
        if version is None and name in self.engines:
            return name, self.engines[name]
        loaded = {e.manifest.version: (k, e) for k, e in self.engines.items() if e.name == name}
        if version is None and len(loaded) > 1:
            version = releases.resolve(session, name, list(loaded)).live
        if version is None:
            return next(iter(loaded.values()), None)
        return loaded.get(version)

    def _not_loaded(self, engine: str) -> str:
        loaded = ", ".join(sorted(self.engines)) or "none"
        return (
            f"engine {engine!r} is not loaded on this node (loaded: {loaded}); "
            "the rules that routed the job name an engine the node does not have"
        )

    def _busy(self, key: str) -> int:
        calls = [*self._calls.values(), *self._shadow_calls.values()]
        return sum(call.key == key for call in calls)

    def _submit(
        self,
        session: Session,
        job: Job,
        name: str,
        key: str,
        chosen: list[str],
        shadows: tuple[str, ...],
    ) -> None:
        assert job.id is not None
        engine = self.engines[key]
        progress = self._progress[job.id]
        if not progress.counted:
            self._count_attempt(session, job)
            progress.counted = True
        uids, future = self._start(session, job, key, chosen, folder=name)
        self._calls[job.id] = _Call(
            job.id, name, key, engine, uids, future, time.monotonic(), shadows
        )
        log.info(
            "inference.started",
            job=job.id,
            study=job.study_id,
            engine=name,
            images=len(uids),
            priority=job.priority.value,
            attempt=job.attempts,
        )

    def _count_attempt(self, session: Session, job: Job) -> None:
        """Record the attempt before its first image is decoded (and clear the retry time:
        an attempt counted with none set has not ended, see `_start_calls`)."""
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.routed)  # type: ignore[arg-type]
            .values(attempts=Job.attempts + 1, next_attempt_at=None)
        )
        session.commit()
        session.refresh(job)

    def _start(
        self, session: Session, job: Job, key: str, chosen: list[str], *, folder: str
    ) -> tuple[list[str], Future[list[Answer]]]:
        """Submit one call of the engine at `key` on the images `chosen` (those indexed);
        segment masks go under the job's answers folder, in `folder`."""
        engine = self.engines[key]
        instances = session.exec(
            select(Instance).where(Instance.sop_instance_uid.in_(chosen))  # type: ignore[attr-defined]
        ).all()
        paths = {i.sop_instance_uid: self.spool / i.path for i in instances}
        uids = [uid for uid in chosen if uid in paths]  # an input never indexed has no answer
        study = session.get(Study, job.study_id)
        where = f"{study.study_uid if study else job.study_id}/{job.id}/{folder}"
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = ThreadPoolExecutor(
                engine.options.concurrency, thread_name_prefix=f"engine-{key}"
            )
        future = pool.submit(self._call, engine, [paths[uid] for uid in uids], where)
        future.add_done_callback(lambda _: self._call_ended.set())
        return uids, future

    def _call(self, engine: Engine, paths: Sequence[Path], folder: str) -> list[Answer]:
        """On an engine worker: read the images, run the engine."""
        if engine.manifest.task is TaskKind.segment and self.answers is None:
            raise RuntimeError("no answers folder to write segmentation masks to")
        images = [dcmread(path) for path in paths]
        return engine.answer(images, self.answers, folder)

    # --- collecting calls ------------------------------------------------------------------

    def _collect(self, session: Session) -> None:
        for job_id, call in list(self._calls.items()):
            if not self.worker.holds(Job, job_id):  # its lease was taken over: not ours to end
                del self._calls[job_id]
                self._progress.pop(job_id, None)
                log.warning("inference.claim_lost", job=job_id, engine=call.name)
            elif call.future.done():
                del self._calls[job_id]
                error = call.future.exception()
                if error is None:
                    self._answered(call, call.future.result())
                else:
                    failure = f"{type(error).__name__}: {error}"
                    final = isinstance(error, ImageRefused)  # the same bytes, refused again
                    self._attempt_failed(session, job_id, call.name, failure, final=final)
            elif time.monotonic() >= call.deadline:
                del self._calls[job_id]
                self._abandon_pool(call.key)
                timeout = call.engine.options.timeout_s
                self._attempt_failed(session, job_id, call.name, f"timed out after {timeout:g} s")

    def _answered(self, call: _Call, answers: list[Answer]) -> None:
        progress = self._progress.setdefault(call.job_id, _Progress())
        seconds = round(time.monotonic() - call.started, 3)
        for uid, answer in zip(call.uids, answers, strict=True):
            progress.answers[(call.name, uid)] = answer
        progress.results += _results(call, answers, seconds, shadow=False)
        progress.shadow_runs += [
            ShadowRun(job_id=call.job_id, engine=call.engine.name, version=v, inputs=call.uids)
            for v in call.shadows
            if call.uids
        ]
        progress.step += 1
        log.info(
            "inference.answered",
            job=call.job_id,
            engine=call.name,
            images=len(call.uids),
            seconds=seconds,
        )

    def _abandon_pool(self, name: str) -> None:
        """The stuck worker cannot be stopped: leave its pool to it, give the engine a new one."""
        pool = self._pools.pop(name, None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _attempt_failed(
        self, session: Session, job_id: int, engine: str | None, error: str, *, final: bool = False
    ) -> None:
        """The job's attempt in progress (already counted) failed: it runs again after its
        back-off, or fails with the reason when `final` or its attempts are spent. `engine`:
        the step's engine, None when the node stopped during the attempt."""
        job = session.get(Job, job_id)
        self._progress.pop(job_id, None)  # a retry starts from the first step
        if job is None or job.state is not JobState.routed:
            return
        attempts, backoff = job.attempts, self.settings.backoff
        limit = backoff.max_attempts
        what = f"{engine} failed" if engine else "interrupted"
        reason = (
            f"{what} (attempt {attempts} of {limit}{', not retried' if final else ''}): {error}"
        )
        if final or backoff.gives_up(attempts):
            log.warning("inference.gave_up", job=job.id, engine=engine, reason=error)
            kind = (
                FailureKind.image_refused  # the one final failure: the same bytes, refused again
                if final
                else FailureKind.engine
                if engine
                else FailureKind.interrupted
            )
            self._fail(session, job, reason, kind)
            return
        delay = backoff.delay_s(attempts)
        log.warning(
            "inference.retry",
            job=job.id,
            engine=engine,
            attempt=attempts,
            max_attempts=limit,
            retry_in_s=delay,
            reason=error,
        )
        # Bookkeeping, not a state change: the job stays routed, not due before the delay,
        # when any worker may claim it.
        self.worker.forget(Job, [job.id])
        session.execute(
            update(Job)
            .where(
                col(Job.id) == job.id,
                col(Job.state) == JobState.routed,
                col(Job.claimed_by) == self.worker.identity,  # unless taken over meanwhile
            )
            .values(
                next_attempt_at=utcnow() + dt.timedelta(seconds=delay),
                reason=reason,
                claimed_by=None,
                lease_until=None,
            )
        )
        session.commit()

    # --- shadow runs -----------------------------------------------------------------------
    # A shadow version's run never touches its job: it is queued when the job is inferred,
    # taken only when no live job waits, and its answers (or its failure) are its own row's.

    def _start_shadow_runs(self, session: Session) -> None:
        if self._live_waiting(session):
            return
        while (run := self._claim_shadow_run(session)) is not None:
            self._submit_shadow(session, run)

    def _live_waiting(self, session: Session) -> bool:
        """A routed job due now that no call of any worker is running: it goes first."""
        now = utcnow()
        free_or_ours = or_(
            col(Job.claimed_by).is_(None),
            col(Job.lease_until) < now,
            col(Job.claimed_by) == self.worker.identity,
        )
        waiting = select(Job.id).where(
            col(Job.state) == JobState.routed,
            or_(col(Job.next_attempt_at).is_(None), col(Job.next_attempt_at) <= now),
            free_or_ours,
            col(Job.id).not_in(list(self._calls)),
        )
        return session.exec(waiting.limit(1)).first() is not None

    def _claim_shadow_run(self, session: Session) -> ShadowRun | None:
        """The oldest shadow run for a loaded version with a free worker, claimed for this
        worker (or None)."""
        free = {
            (engine.name, engine.manifest.version): engine
            for key, engine in self.engines.items()
            if self._busy(key) < engine.options.concurrency
        }
        if not free:
            return None
        now = utcnow()
        takeable = or_(
            col(ShadowRun.state) == ShadowRunState.waiting,
            and_(col(ShadowRun.state) == ShadowRunState.running, col(ShadowRun.lease_until) < now),
        )
        loaded = or_(
            *(and_(col(ShadowRun.engine) == n, col(ShadowRun.version) == v) for n, v in free)
        )
        candidates = session.exec(
            select(ShadowRun).where(takeable, loaded).order_by(col(ShadowRun.id)).limit(8)
        ).all()
        for run in candidates:
            timeout = free[(run.engine, run.version)].options.timeout_s
            lease = now + dt.timedelta(seconds=timeout + SHADOW_LEASE_SLACK_S)
            claimed = session.execute(
                update(ShadowRun)
                .where(col(ShadowRun.id) == run.id, takeable)
                .values(
                    state=ShadowRunState.running,
                    claimed_by=self.worker.identity,
                    lease_until=lease,
                )
            )
            session.commit()
            if claimed.rowcount == 1:  # type: ignore[attr-defined]
                return run
        return None

    def _submit_shadow(self, session: Session, run: ShadowRun) -> None:
        assert run.id is not None
        found = self._engine_for(session, run.engine, run.version)
        job = session.get(Job, run.job_id)
        if found is None or job is None:
            why = "its job was removed" if job is None else "its version is not loaded here"
            self._end_shadow_run(session, run.id, why)
            return
        key, engine = found
        folder = engine_key(run.engine, run.version)
        uids, future = self._start(session, job, key, run.inputs, folder=folder)
        self._shadow_calls[run.id] = _Call(
            run.job_id, run.engine, key, engine, uids, future, time.monotonic()
        )
        log.info(
            "shadow.started", job=run.job_id, engine=run.engine, version=run.version, run=run.id
        )

    def _collect_shadow(self, session: Session) -> None:
        for run_id, call in list(self._shadow_calls.items()):
            if call.future.done():
                del self._shadow_calls[run_id]
                error = call.future.exception()
                if error is None:
                    self._shadow_answered(session, run_id, call, call.future.result())
                else:
                    self._end_shadow_run(session, run_id, f"{type(error).__name__}: {error}")
            elif time.monotonic() >= call.deadline:
                del self._shadow_calls[run_id]
                self._abandon_pool(call.key)
                timeout = call.engine.options.timeout_s
                self._end_shadow_run(session, run_id, f"timed out after {timeout:g} s")

    def _shadow_answered(
        self, session: Session, run_id: int, call: _Call, answers: list[Answer]
    ) -> None:
        """The run's answers, stored shadow=True, in the commit that ends the run (while this
        worker still holds it, and its job is still there)."""
        if session.get(Job, call.job_id) is None:
            self._end_shadow_run(session, run_id, "its job was removed")
            return
        seconds = round(time.monotonic() - call.started, 3)
        if self._move_shadow_run(session, run_id, ShadowRunState.done, None):
            session.add_all(_results(call, answers, seconds, shadow=True))
            session.commit()
            log.info(
                "shadow.answered",
                job=call.job_id,
                engine=call.name,
                version=call.engine.manifest.version,
                images=len(call.uids),
                seconds=seconds,
            )
        else:
            session.rollback()

    def _end_shadow_run(self, session: Session, run_id: int, reason: str) -> None:
        """A failed shadow run: recorded on its row only; the live job never waits for it."""
        if self._move_shadow_run(session, run_id, ShadowRunState.failed, reason):
            session.commit()
            log.warning("shadow.failed", run=run_id, reason=reason)
        else:
            session.rollback()

    def _move_shadow_run(
        self, session: Session, run_id: int, to: ShadowRunState, reason: str | None
    ) -> bool:
        moved = session.execute(
            update(ShadowRun)
            .where(
                col(ShadowRun.id) == run_id,
                col(ShadowRun.state) == ShadowRunState.running,
                col(ShadowRun.claimed_by) == self.worker.identity,
            )
            .values(
                state=to, reason=reason, finished_at=utcnow(), claimed_by=None, lease_until=None
            )
        )
        return bool(moved.rowcount == 1)  # type: ignore[attr-defined]

    # --- ending jobs -----------------------------------------------------------------------

    def _finish(self, session: Session, job: Job, progress: _Progress) -> None:
        assert job.id is not None
        self._progress.pop(job.id, None)
        session.add_all(progress.results)
        session.add_all(progress.shadow_runs)  # queued exactly when the job moves on
        record_profiles(session, job, progress.results, self.spool)  # drift, same commit
        self.worker.transition(session, job, JobState.inferred, expect=JobState.routed)

    def _fail(self, session: Session, job: Job, reason: str, failure: FailureKind) -> None:
        assert job.id is not None
        self._progress.pop(job.id, None)
        self.worker.transition(
            session, job, JobState.failed, expect=JobState.routed, reason=reason, failure=failure
        )

    # --- timing ----------------------------------------------------------------------------

    def _time_to_deadline(self) -> float:
        now = time.monotonic()
        calls = [*self._calls.values(), *self._shadow_calls.values()]
        return max(0.0, min((call.deadline - now for call in calls), default=POLL_S))

    def _retry_due_in(self, session: Session) -> float | None:
        now = utcnow()
        later = [
            (_aware(job.next_attempt_at) - now).total_seconds()
            for job in self.database.jobs_in(session, JobState.routed)
            if job.next_attempt_at is not None and not _due(job, now)
        ]
        return max(0.0, min(later)) if later else None


def _results(call: _Call, answers: list[Answer], seconds: float, *, shadow: bool) -> list[Result]:
    """One Result per image of the call, with the engine version that gave it."""
    engine = call.engine
    return [
        Result(
            job_id=call.job_id,
            engine=engine.name,
            engine_version=engine.manifest.version,
            model_sha256=engine.bundle.sha256,
            sop_instance_uid=uid,
            answer=dump_answer(answer),
            seconds=seconds,
            shadow=shadow,
        )
        for uid, answer in zip(call.uids, answers, strict=True)
    ]


def _aware(moment: dt.datetime) -> dt.datetime:
    """SQLite keeps no time zone; cadnode writes UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _due(job: Job, now: dt.datetime) -> bool:
    return job.next_attempt_at is None or _aware(job.next_attempt_at) <= now
