"""The node's DICOM port: every DIMSE service it serves, in its own process or in several.

`node_services` builds what other stages serve beside receive's C-ECHO, C-STORE and MPPS:
the UPS worklist, Storage Commitment answers (N-EVENT-REPORT) and Query/Retrieve. All their
state is in the database (and `cadnode.core.locks` for their read-modify-writes), so any process
can serve any of them.

With `dicom.receivers: 1` (the default) receive runs in the node's process. With N > 1 one
Python process would hold the interpreter lock for every association at once, so the node
binds the port once and starts N receiver processes (`spawn`: forking a process that runs
threads is unsafe) that accept on that same listening socket; the kernel hands each
connection to one of them, whichever is free to accept it first. The node's process does
not accept: it keeps the stages, the admin port and the socket, so a receiver that dies is
restarted on the same socket without a connection in the backlog being dropped (separate
SO_REUSEPORT sockets would drop a dead one's backlog, and let another program of the same
user bind the port too).

A receiver wakes the node's stages through a pipe: one byte per committed change, which a
thread here turns into `Conveyor.nudge` (a full pipe already holds a wake-up). SIGTERM to
the node drains every receiver (each finishes its associations within
`dicom.drain_timeout_s`) before the stages stop. A receiver whose node has gone (SIGKILL)
closes the port and exits within a fraction of a second.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import structlog

from cadnode.core import logs
from cadnode.core.config import Settings
from cadnode.core.db import Database
from cadnode.deliver.commitment import CommitmentScp
from cadnode.dicom.services import Service
from cadnode.ingest.receive import Receiver
from cadnode.ingest.spool import Spool
from cadnode.prioritize import ups_services
from cadnode.serve import QueryRetrieveScp

log = structlog.get_logger("cadnode.port")

# How long a receiver process may take to import, open the database and start accepting.
START_TIMEOUT_S = 120.0
# A receiver that dies sooner than this after starting is restarted only after a pause.
CRASH_LOOP_S = 5.0
PARENT_CHECK_S = 0.2
BACKLOG = 128


def node_services(settings: Settings, database: Database) -> list[Service]:
    """Other stages' DIMSE services on the node's port (receive adds C-ECHO, C-STORE, MPPS)."""
    return [
        *ups_services(settings, database),
        CommitmentScp(database).service(),
        *QueryRetrieveScp(settings, database).services,
    ]


def receiver_in_process(
    settings: Settings, database: Database, on_change: Callable[[], None]
) -> Receiver:
    return Receiver(settings, database, on_change, services=node_services(settings, database))


@dataclass
class _Worker:
    number: int
    process: BaseProcess
    wakes: Connection
    started_at: float = field(default_factory=time.monotonic)
    ready: threading.Event = field(default_factory=threading.Event)


class ReceiverProcesses:
    """N receiver processes on one listening socket; the same interface as `Receiver`."""

    def __init__(self, settings: Settings, database: Database, on_change: Callable[[], None]):
        self.settings = settings
        self.database = database
        self.on_change = on_change
        self._context = multiprocessing.get_context("spawn")
        self._listening: socket.socket | None = None
        self._workers: dict[int, _Worker] = {}
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def reconcile(self) -> dict[str, int]:
        """Make spool and index agree before any receiver process starts."""
        storage = self.settings.storage
        spool = Spool(storage.spool, self.database, int(storage.min_free_mb * 2**20))
        try:
            return spool.reconcile(storage.quarantine)
        finally:
            spool.close()

    def start(self) -> int:
        dicom = self.settings.dicom
        self._listening = _bound(dicom.bind, dicom.port)
        port = int(self._listening.getsockname()[1])
        workers = [self._spawn(number) for number in range(dicom.receivers)]
        for worker in workers:
            self._await_ready(worker)
        self._listening.listen(BACKLOG)
        self._supervisor = threading.Thread(
            target=self._supervise, name="receive-supervisor", daemon=True
        )
        self._supervisor.start()
        log.info("receive.processes", processes=dicom.receivers, port=port)
        return port

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """SIGTERM each receiver (it drains its associations), wait, then close the socket."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        dicom = self.settings.dicom
        timeout = dicom.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        workers = list(self._workers.values())
        for worker in workers:
            if worker.process.pid is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGTERM)
        # Beyond the drain: the time a receiver takes to abort what is left and exit.
        deadline = time.monotonic() + timeout + 10.0
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning("receive.process_killed", receiver=worker.number)
                worker.process.kill()
                worker.process.join()
        if self._listening is not None:
            self._listening.close()
        log.info(
            "receive.processes_stopped",
            exit_codes=[worker.process.exitcode for worker in workers],
        )

    def _spawn(self, number: int) -> _Worker:
        assert self._listening is not None
        wakes, waker = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_receive,
            args=(self.settings, self._listening, waker, number),
            name=f"cadnode-receiver-{number}",
            daemon=False,  # it drains its associations on SIGTERM; stop() waits for it
        )
        process.start()
        waker.close()  # the child holds the write end: its death is an end of file here
        worker = _Worker(number, process, wakes)
        self._workers[number] = worker
        threading.Thread(
            target=self._relay, args=(worker,), name=f"receive-wakes-{number}", daemon=True
        ).start()
        log.info("receive.process_started", receiver=number, pid=process.pid)
        return worker

    def _await_ready(self, worker: _Worker) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not worker.ready.wait(0.1):
            if not worker.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"receiver process {worker.number} did not start"
                    f" (exit code {worker.process.exitcode})"
                )

    def _relay(self, worker: _Worker) -> None:
        """The receiver's wake-ups, as nudges to the stages here, until it exits."""
        descriptor = worker.wakes.fileno()
        while os.read(descriptor, 4096):
            worker.ready.set()
            self.on_change()
        worker.wakes.close()

    def _supervise(self) -> None:
        """Restart a receiver that exits while the node is not stopping."""
        while not self._stopping.is_set():
            sentinels = {w.process.sentinel: w for w in self._workers.values()}
            for sentinel in wait(list(sentinels), timeout=PARENT_CHECK_S):
                if self._stopping.is_set():
                    return
                assert isinstance(sentinel, int)
                dead = sentinels[sentinel]
                dead.process.join()
                log.error(
                    "receive.process_died", receiver=dead.number, exit_code=dead.process.exitcode
                )
                if time.monotonic() - dead.started_at < CRASH_LOOP_S:
                    self._stopping.wait(1.0)
                if not self._stopping.is_set():
                    self._spawn(dead.number)


def _bound(bind: str, port: int) -> socket.socket:
    """The port, bound but not yet listening: until every receiver is up, peers are refused
    (as by a node not started) rather than queued for whichever receiver starts first."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    bound = socket.socket(family, socket.SOCK_STREAM)
    # As pynetdicom sets it: a restart binds while the last run's connections linger.
    bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    bound.bind((bind, port))
    return bound


def _receive(settings: Settings, listening: socket.socket, waker: Connection, number: int) -> None:
    """A receiver process: serve on the node's socket until SIGTERM or the node's death."""
    logs.configure()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the node stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the node reloads rules; receivers don't route
    descriptor = waker.fileno()
    os.set_blocking(descriptor, False)

    def wake_the_node() -> None:
        with contextlib.suppress(BlockingIOError):  # full: wake-ups the node has yet to read
            os.write(descriptor, b"!")

    database = Database(settings.storage.database)
    database.on_change = wake_the_node
    receiver = receiver_in_process(settings, database, wake_the_node)
    receiver.start(listening)
    wake_the_node()  # the first byte says it is accepting
    parent = multiprocessing.parent_process()
    orphaned = False
    while not stop.wait(PARENT_CHECK_S):
        if parent is not None and not parent.is_alive():
            orphaned = True
            break
    if orphaned:
        log.error("receive.node_gone", receiver=number)
        receiver.stop(drain_timeout_s=0)
        os._exit(1)
    receiver.stop()
