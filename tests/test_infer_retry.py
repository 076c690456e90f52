"""Engine faults: a failing or stuck engine call is retried with back-off and then fails its
job with the reason, while other jobs and engines go on; per-engine concurrency limits. An
attempt is counted before its images are decoded (one that never ended failed), and an image
refused by cadnode.dicom.pixels fails its job at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from pydicom import Dataset

from cadnode.core.config import EngineOptions, EngineSettings
from cadnode.core.db import Database, JobState, PriorityClass
from cadnode.dicom.pixels import DEFAULT_LIMIT, LIMIT_KEY
from cadnode.infer.answers import Answer
from cadnode.infer.bundle import Bundle
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.infer.runtime import Engine
from cadnode.infer.stage import Inference
from tests.infer_jobs import Gated, routed_job, run_until
from tests.peers import REPO, wait_for
from tests.rows import job_of, results_of

RULEOUT = Bundle(REPO / "engines" / "cxr-ruleout")


class Broken(Engine):
    """The real rule-out bundle, whose model call fails at run time."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle, max_decoded_bytes=DEFAULT_LIMIT)
        self.called_at: list[float] = []

    @property
    def calls(self) -> int:
        return len(self.called_at)

    def answer(
        self, images: Sequence[Dataset], answers_dir: Path | None = None, folder: str = ""
    ) -> list[Answer]:
        self.called_at.append(time.monotonic())
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def film_job(
    database: Database,
    spool: Path,
    seed: int,
    engine: str,
    priority: PriorityClass = PriorityClass.routine,
) -> int:
    path = spool / f"{seed}.dcm"
    ds = write_chest_radiograph(path, seed=seed, size=128)
    return routed_job(database, spool, ds, path, pipeline=[{"engine": engine}], priority=priority)


def test_a_failing_engine_is_retried_with_back_off_then_fails_its_job_while_others_go_on(
    database: Database, tmp_path: Path
) -> None:
    broken = Broken(RULEOUT)
    engines = {"broken": broken, "cxr-ruleout": Engine(RULEOUT, max_decoded_bytes=DEFAULT_LIMIT)}
    settings = EngineSettings(max_attempts=3, retry_backoff_s=1.0)
    stage = Inference(database, tmp_path, engines, settings=settings)
    failing = film_job(database, tmp_path, 1, "broken", priority=PriorityClass.urgent)
    working = film_job(database, tmp_path, 2, "cxr-ruleout")

    with structlog.testing.capture_logs() as events:
        first_delay = stage.advance()
        assert job_of(database, working).state is JobState.inferred  # not held up
        retrying = job_of(database, failing)
        assert retrying.state is JobState.routed and retrying.attempts == 1
        assert first_delay is not None and 0 < first_delay <= 1.0  # the conveyor's wake-up
        run_until(stage, lambda: job_of(database, failing).state is JobState.failed, 30, "failure")

    job = job_of(database, failing)
    assert broken.calls == 3 and job.attempts == 3
    # Never retried before it was due (however slowly the machine ran the rest).
    first, second, third = broken.called_at
    assert second - first >= 1.0 and third - second >= 2.0
    assert job.reason is not None
    assert job.reason.startswith("broken failed (attempt 3 of 3): RuntimeError: CUDA error")
    assert results_of(database, failing) == []
    assert len(results_of(database, working)) == 1
    retries = [e for e in events if e["event"] == "inference.retry"]
    assert [e["retry_in_s"] for e in retries] == [1.0, 2.0]  # retry_backoff_s * 2**(n-1)
    assert all(e["job"] == failing and e["engine"] == "broken" for e in retries)
    assert [e["job"] for e in events if e["event"] == "job.failed"] == [failing]
    assert any(e["event"] == "inference.gave_up" for e in events)
    logged = repr(events)
    assert "PHANTOM" not in logged and "Phantom" not in logged  # no patient identifiers


def test_an_engine_call_past_its_timeout_fails_the_attempt_without_blocking_the_stage(
    database: Database, tmp_path: Path
) -> None:
    stuck = Gated(RULEOUT, EngineOptions(timeout_s=0.5))
    engines = {"stuck": stuck, "cxr-ruleout": Engine(RULEOUT, max_decoded_bytes=DEFAULT_LIMIT)}
    stage = Inference(database, tmp_path, engines, settings=EngineSettings(max_attempts=1))
    waiting = film_job(database, tmp_path, 3, "stuck")
    try:
        started = time.monotonic()
        stage.advance()
        assert time.monotonic() - started < 20  # the stuck call was left behind
        job = job_of(database, waiting)
        assert job.state is JobState.failed
        assert job.reason == "stuck failed (attempt 1 of 1): timed out after 0.5 s"
        assert stuck.running == 1  # its thread cannot be killed: it is still in the call
        # The stage goes on with other work, and the stuck engine gets fresh workers.
        other = film_job(database, tmp_path, 4, "cxr-ruleout")
        again = film_job(database, tmp_path, 5, "stuck")
        stuck.gate.set()
        stage.advance()
        assert job_of(database, other).state is JobState.inferred
        assert job_of(database, again).state is JobState.inferred
    finally:
        stuck.gate.set()
        stage.close()


def test_an_engine_runs_at_most_its_concurrency_at_once(database: Database, tmp_path: Path) -> None:
    for limit in (1, 2):
        engine = Gated(RULEOUT, EngineOptions(concurrency=limit))
        stage = Inference(database, tmp_path, {f"gated-{limit}": engine})
        jobs = [film_job(database, tmp_path, 10 * limit + n, f"gated-{limit}") for n in range(3)]
        worker = threading.Thread(target=stage.advance)
        worker.start()
        try:
            wait_for(lambda e=engine, n=limit: e.running == n, 30, f"{limit} call(s) running")
            time.sleep(0.3)  # room for a call beyond the limit to start, were it allowed
            assert engine.running == limit
        finally:
            engine.gate.set()
            worker.join(60)
        assert engine.most_at_once == limit
        assert all(job_of(database, job).state is JobState.inferred for job in jobs)


def test_a_pipeline_naming_an_engine_not_loaded_fails_with_the_reason(
    database: Database, tmp_path: Path
) -> None:
    stage = Inference(
        database, tmp_path, {"cxr-ruleout": Engine(RULEOUT, max_decoded_bytes=DEFAULT_LIMIT)}
    )
    job_id = film_job(database, tmp_path, 6, "cxr-nope")
    assert stage.advance() is None
    job = job_of(database, job_id)
    assert job.state is JobState.failed and job.attempts == 0
    assert job.reason is not None
    assert job.reason.startswith("engine 'cxr-nope' is not loaded on this node")
    assert "(loaded: cxr-ruleout)" in job.reason


class Counting(Engine):
    """The real rule-out engine, counting its calls."""

    def __init__(self, bundle: Bundle, **options: Any) -> None:
        super().__init__(bundle, **{"max_decoded_bytes": DEFAULT_LIMIT, **options})
        self.calls = 0

    def answer(
        self, images: Sequence[Dataset], answers_dir: Path | None = None, folder: str = ""
    ) -> list[Answer]:
        self.calls += 1
        return super().answer(images, answers_dir, folder)


def test_an_image_over_the_decode_limit_fails_its_job_once_naming_the_limit(
    database: Database, tmp_path: Path
) -> None:
    small_limit = Counting(RULEOUT, max_decoded_bytes=1000)  # a 128 x 128 film is 32 KiB
    stage = Inference(database, tmp_path, {"tight": small_limit}, settings=EngineSettings())
    job_id = film_job(database, tmp_path, 8, "tight")
    with structlog.testing.capture_logs() as events:
        assert stage.advance() is None  # nothing to retry
    job = job_of(database, job_id)
    assert job.state is JobState.failed and job.attempts == 1 and small_limit.calls == 1
    assert job.reason is not None
    assert job.reason.startswith("tight failed (attempt 1 of 3, not retried): ImageRefused:")
    assert f"{LIMIT_KEY})" in job.reason
    assert not [e for e in events if e["event"] == "inference.retry"]


def test_an_attempt_running_when_the_node_stopped_counts_as_failed_at_restart(
    database: Database, tmp_path: Path
) -> None:
    """The attempt is in the database before the image is decoded: an image that kills the
    node is tried `max_attempts` times in all, not at every start."""
    settings = EngineSettings(max_attempts=1)
    dying = Gated(RULEOUT)  # its call never returns while the test holds the gate
    before_the_crash = Inference(database, tmp_path, {"cxr-ruleout": dying}, settings=settings)
    job_id = film_job(database, tmp_path, 9, "cxr-ruleout")
    worker = threading.Thread(target=before_the_crash.advance)
    worker.start()
    try:
        assert dying.started.wait(30)
        assert job_of(database, job_id).attempts == 1  # counted before any image was read
        after_restart = Counting(RULEOUT)
        restarted = Inference(database, tmp_path, {"cxr-ruleout": after_restart}, settings=settings)
        assert restarted.advance() is None
    finally:
        dying.gate.set()
        worker.join(60)
    job = job_of(database, job_id)
    assert job.state is JobState.failed and job.attempts == 1 and after_restart.calls == 0
    assert job.reason == "interrupted (attempt 1 of 1): the node stopped during this attempt"
    assert results_of(database, job_id) == []  # the old call's late answer is dropped
