"""The conveyor: runs every stage in its own thread and wakes it when there is work.

A stage is woken when any stage (or receive) commits a change, when its own timer falls
due (a quiet period ending, a delivery's back-off expiring: timers are APScheduler jobs),
and by a slow poll that catches work left by a restart. Stages never call each other.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Protocol

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

log = structlog.get_logger("cadnode.core.runner")


class Stage(Protocol):
    name: str

    def advance(self) -> float | None:
        """Do all the work due now; return seconds until more falls due, or None."""
        ...


class Conveyor:
    def __init__(self, stages: list[Stage], poll_s: float = 5.0) -> None:
        self.stages = stages
        self.poll_s = poll_s
        self._wake = {stage.name: threading.Event() for stage in stages}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._timers = BackgroundScheduler(timezone=dt.UTC)

    def start(self) -> None:
        self._timers.start()
        for stage in self.stages:
            thread = threading.Thread(
                target=self._run, args=(stage,), name=f"stage-{stage.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def nudge(self) -> None:
        """Something changed in the database: every stage looks again."""
        for wake in self._wake.values():
            wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let every stage finish what it is doing, within one shared deadline."""
        self._stopping.set()
        self.nudge()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._timers.shutdown(wait=False)
        # A stage still busy is cut off at exit: its job, never moved on, is redone next start.
        busy = [thread.name for thread in self._threads if thread.is_alive()]
        log.info("conveyor.stopped", busy=busy)

    def _run(self, stage: Stage) -> None:
        wake = self._wake[stage.name]
        while not self._stopping.is_set():
            wake.clear()
            try:
                due_in = stage.advance()
            except Exception:
                # A bug in one stage must not kill its thread: log it and try again later.
                log.exception("stage.crashed", stage=stage.name)
                due_in = self.poll_s
            if due_in is not None:
                self._set_timer(stage.name, due_in)
            wake.wait(self.poll_s)

    def _set_timer(self, name: str, due_in: float) -> None:
        run_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max(due_in, 0.0))
        self._timers.add_job(
            self._wake[name].set,
            "date",
            run_date=run_at,
            id=f"timer-{name}",
            replace_existing=True,
            misfire_grace_time=None,
        )
