"""Routed jobs, as route leaves them, for the infer stage's tests; and a way to run the stage."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset

from cadnode.core.config import EngineOptions
from cadnode.core.db import Database, JobState, PriorityClass
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.answers import Answer
from cadnode.infer.bundle import Bundle
from cadnode.infer.runtime import Engine
from cadnode.infer.stage import Inference
from tests.peers import wait_for
from tests.rows import instance_row, new_job

RULEOUT = [{"engine": "cxr-ruleout"}]
CASCADE = [
    {"engine": "cxr-ruleout"},
    {"engine": "cxr-segmenter", "when": {"step": "cxr-ruleout", "ruled_out": False}},
]


def routed_job(
    database: Database,
    spool: Path,
    ds: Dataset,
    path: Path,
    *,
    pipeline: list[dict[str, Any]] | None = None,
    priority: PriorityClass = PriorityClass.routine,
) -> int:
    """A job in state routed for one image `ds` written at `path` under `spool`, with the
    given pipeline (default: the rule-out engine alone)."""
    with database.session() as session:
        job = new_job(
            session,
            str(ds.StudyInstanceUID),
            state=JobState.routed,
            priority=priority,
            pipeline=pipeline or RULEOUT,
            inputs=[str(ds.SOPInstanceUID)],
            instance_count=1,
        )
        session.add(instance_row(ds, str(path.relative_to(spool)), job))
        session.commit()
        assert job.id is not None
        return job.id


def run_until(stage: Inference, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Advance the stage (as the conveyor would, retries included) until `condition` holds."""

    def advanced() -> bool:
        stage.advance()
        return condition()

    wait_for(advanced, timeout_s, what)


class Gated(Engine):
    """A real engine whose calls wait until the test opens `gate`, counting themselves."""

    def __init__(self, bundle: Bundle, options: EngineOptions | None = None) -> None:
        super().__init__(bundle, options, max_decoded_bytes=DEFAULT_LIMIT)
        self.gate = threading.Event()
        self.started = threading.Event()
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def answer(
        self, images: Sequence[Dataset], answers_dir: Path | None = None, folder: str = ""
    ) -> list[Answer]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.started.set()
        try:
            if not self.gate.wait(60):
                raise TimeoutError("the test never opened the gate")
            return super().answer(images, answers_dir, folder)
        finally:
            with self._lock:
                self.running -= 1
