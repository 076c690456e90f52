"""The node's child processes: started, supervised, restarted, stopped.

The node runs some of its work in child processes (the DICOM port's receivers,
cadnode/port.py; the CPU-bound stages' workers, cadnode/workers.py), each started with
multiprocessing `spawn` (forking a process that runs threads is unsafe). Both kinds are kept
the same way, here:

- a child tells the node "something changed in the database" by writing one byte to a pipe;
  a thread here turns each read into `on_change` (a full pipe already holds a wake-up). Its
  first byte says it is ready; its death is an end of file on the pipe;
- the node can wake a child too (`nudge`), through a second pipe, for children that run
  stages of their own (`nudged=True`);
- a child that exits while the node is not stopping is restarted (event
  `<kind>.process_died`), after a pause if it died within `CRASH_LOOP_S` of starting;
- `stop` sends SIGTERM to each (a child drains: finishes what it holds), waits, and kills
  what outlives the deadline;
- a child whose node has gone (SIGKILL) notices within `PARENT_CHECK_S` and exits.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import structlog

log = structlog.get_logger("cadnode.children")

# How long a child may take to import, open the database and say it is ready.
START_TIMEOUT_S = 120.0
# A child that dies sooner than this after starting is restarted only after a pause.
CRASH_LOOP_S = 5.0
PARENT_CHECK_S = 0.2
# Beyond a child's own drain: the time it takes to abort what is left and exit.
EXIT_GRACE_S = 10.0


@dataclass
class _Child:
    number: int
    process: BaseProcess
    wakes: Connection  # read end: the child's wake-ups
    nudges: Connection | None  # write end of the node's wake-ups to the child
    started_at: float = field(default_factory=time.monotonic)
    ready: threading.Event = field(default_factory=threading.Event)


class Children:
    """`count` child processes running `target(*args, Link, number)`, kept running.

    `kind` names them in the log (`receive`: events `receive.process_started` with
    `receiver=N`; `worker`: `worker.process_started` with `worker=N`).
    """

    def __init__(
        self,
        kind: str,
        label: str,
        count: int,
        target: Callable[..., None],
        args: tuple[Any, ...],
        on_change: Callable[[], None],
        *,
        nudged: bool = False,
        on_death: Callable[[int], None] = lambda _pid: None,
    ) -> None:
        self.kind = kind
        self.label = label
        self.count = count
        self.target = target
        self.args = args
        self.on_change = on_change
        self.nudged = nudged
        self.on_death = on_death  # called with a dead child's pid before it is replaced
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, _Child] = {}
        self._guard = threading.Lock()  # the supervisor replaces children while nudge reads
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        """Start every child, wait until each says it is ready, then supervise them."""
        started = [self._spawn(number) for number in range(self.count)]
        for child in started:
            self._await_ready(child)
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"{self.kind}-supervisor", daemon=True
        )
        self._supervisor.start()

    @property
    def pids(self) -> list[int]:
        with self._guard:
            return [c.process.pid for c in self._children.values() if c.process.pid is not None]

    def nudge(self) -> None:
        """Something changed in the database: every child's stages look again."""
        with self._guard:
            pipes = [c.nudges for c in self._children.values() if c.nudges is not None]
        for pipe in pipes:
            # Full: wake-ups the child has yet to read; closed: a dead child, being replaced.
            with contextlib.suppress(OSError):
                os.write(pipe.fileno(), b"!")

    def stop(self, timeout_s: float) -> list[int | None]:
        """SIGTERM each child (it drains within `timeout_s`), wait, kill what is left; the
        exit codes (logged as `<kind>.processes_stopped`)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        children = list(self._children.values())
        for child in children:
            if child.process.pid is not None and child.process.is_alive():
                os.kill(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s + EXIT_GRACE_S
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.warning(f"{self.kind}.process_killed", **{self.label: child.number})
                child.process.kill()
                child.process.join()
            if child.nudges is not None:
                child.nudges.close()
        codes = [child.process.exitcode for child in children]
        log.info(f"{self.kind}.processes_stopped", exit_codes=codes)
        return codes

    def _spawn(self, number: int) -> _Child:
        wakes, waker = self._context.Pipe(duplex=False)
        heard, nudges = self._context.Pipe(duplex=False) if self.nudged else (None, None)
        process = self._context.Process(
            target=_run_child,
            args=(self.target, self.args, Link(waker, heard), number),
            name=f"cadnode-{self.label}-{number}",
            daemon=False,  # it drains on SIGTERM; stop() waits for it
        )
        process.start()
        waker.close()  # the child holds the write end: its death is an end of file here
        if heard is not None and nudges is not None:
            heard.close()  # the child holds the read end
            os.set_blocking(nudges.fileno(), False)
        child = _Child(number, process, wakes, nudges)
        with self._guard:
            earlier = self._children.get(number)
            self._children[number] = child
        if earlier is not None and earlier.nudges is not None:
            earlier.nudges.close()
        threading.Thread(
            target=self._relay, args=(child,), name=f"{self.kind}-wakes-{number}", daemon=True
        ).start()
        log.info(f"{self.kind}.process_started", **{self.label: number}, pid=process.pid)
        return child

    def _await_ready(self, child: _Child) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not child.ready.wait(0.1):
            if not child.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.label} process {child.number} did not start"
                    f" (exit code {child.process.exitcode})"
                )

    def _relay(self, child: _Child) -> None:
        """The child's wake-ups, as `on_change` here, until it exits."""
        descriptor = child.wakes.fileno()
        while os.read(descriptor, 4096):
            child.ready.set()
            self.on_change()
        child.wakes.close()

    def _supervise(self) -> None:
        """Restart a child that exits while the node is not stopping."""
        while not self._stopping.is_set():
            with self._guard:
                sentinels = {c.process.sentinel: c for c in self._children.values()}
            for sentinel in wait(list(sentinels), timeout=PARENT_CHECK_S):
                if self._stopping.is_set():
                    return
                assert isinstance(sentinel, int)
                dead = sentinels[sentinel]
                dead.process.join()
                log.error(
                    f"{self.kind}.process_died",
                    **{self.label: dead.number},
                    pid=dead.process.pid,
                    exit_code=dead.process.exitcode,
                )
                self._bury(dead)
                if time.monotonic() - dead.started_at < CRASH_LOOP_S:
                    self._stopping.wait(1.0)
                if not self._stopping.is_set():
                    self._spawn(dead.number)


    def _bury(self, dead: _Child) -> None:
        """What the dead child held (its claims) is freed; a failure here only leaves it to
        run out, so it must not stop the supervisor."""
        if dead.process.pid is None:
            return
        try:
            self.on_death(dead.process.pid)
        except Exception:
            log.exception(f"{self.kind}.process_not_buried", pid=dead.process.pid)


class Link:
    """A child's side of its pipes to the node: its wake-ups to it, and the node's to it."""

    def __init__(self, waker: Connection, heard: Connection | None) -> None:
        self._waker = waker
        self._heard = heard
        self._stop: threading.Event | None = None  # made in the child (it does not pickle)

    def begin(self) -> None:
        """In the child, first: SIGTERM asks it to stop; the node handles the terminal's
        Ctrl-C and SIGHUP (rules reload), not its children."""
        stop = self._stop = threading.Event()
        os.set_blocking(self._waker.fileno(), False)
        signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def wake_the_node(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: wake-ups the node has yet to read
            os.write(self._waker.fileno(), b"!")

    def on_nudge(self, nudged: Callable[[], None]) -> None:
        """Call `nudged` on each wake-up from the node (from a thread of its own)."""
        heard = self._heard
        if heard is None:
            raise RuntimeError("this child was started without nudges")

        def listen() -> None:
            while os.read(heard.fileno(), 4096):
                nudged()

        threading.Thread(target=listen, name="node-nudges", daemon=True).start()

    def serve_until_stopped(self) -> bool:
        """Block until SIGTERM (True) or the node's death (False: the node was killed and
        nothing will drain us; exit at once)."""
        parent = multiprocessing.parent_process()
        assert self._stop is not None, "begin() first"
        while not self._stop.wait(PARENT_CHECK_S):
            if parent is not None and not parent.is_alive():
                return False
        return True


def _run_child(target: Callable[..., None], args: tuple[Any, ...], link: Link, number: int) -> None:
    link.begin()
    target(*args, link, number)
