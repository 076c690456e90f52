"""The CPU-bound stages (infer, encode), in the node's process or in worker processes.

Profiled on a backlog of chest films (benchmarks/backlog.py, py-spy on the interpreter
lock), encode holds the lock for more than half of each film's time (building the SR),
infer's pre- and post-processing for a few per cent more; the other stages mostly wait on
the database and the network. One Python process runs one of them at a time, however many
cores the machine has.

With `node.workers: 1` (the default) `cpu_stages` run in the node's process, on its conveyor,
beside the other stages. With N > 1 the node starts N worker processes (kept as the node keeps
its receivers, cadnode/core/children.py: `spawn`, restarted when they die, drained by
SIGTERM), each opening the database, loading the engines and running infer and encode on a
conveyor of its own; the node's process keeps receive, assemble, route, dispatch, prioritize,
publish, retention, the watchdogs and the admin port. Stages talk through the database, and
each claims a job before working it (cadnode/core/claims.py), so N workers never work one job
twice; a killed worker's claims are taken over after their lease (`node.lease_s`).

Wake-ups cross the processes through pipes: a worker's committed change wakes the node
(one byte), which wakes its own stages and every worker (one byte each); the conveyor's
5-second poll catches anything a full pipe dropped. ONNX Runtime gets the worker's share of
the cores (cores // N, at least 1), so N workers do not each start a thread per core.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import structlog

from cadnode.core import logs
from cadnode.core.children import Children, Link
from cadnode.core.claims import free_claims, node_name, worker_for
from cadnode.core.config import Settings
from cadnode.core.db import Database
from cadnode.core.runner import Conveyor, Stage
from cadnode.encode.stage import Encoder
from cadnode.infer.runtime import Engine, load_engines
from cadnode.infer.stage import Inference

log = structlog.get_logger("cadnode.workers")


def cpu_stages(
    settings: Settings, database: Database, engines: Mapping[str, Engine]
) -> list[Stage]:
    """Infer and encode, as the node's process or a worker runs them."""
    storage = settings.storage
    return [
        Inference(
            database,
            storage.spool,
            dict(engines),
            answers=storage.answers,
            settings=settings.engines,
        ),
        Encoder(
            database,
            storage.spool,
            storage.results,
            settings.named_result_destinations(),
            answers=storage.answers,
            max_decoded_bytes=settings.limits.max_decoded_image_bytes,
        ),
    ]


def intra_op_threads(workers: int) -> int:
    """ONNX Runtime threads per call in each of `workers` processes (0: its default, one per
    core, for the node's own process)."""
    if workers <= 1:
        return 0
    return max(1, len(os.sched_getaffinity(0)) // workers)


class WorkerProcesses:
    """`node.workers` processes running `cpu_stages`, woken by `nudge`."""

    def __init__(
        self, settings: Settings, database: Database, on_change: Callable[[], None]
    ) -> None:
        self.settings = settings
        self.database = database  # the node's: to free a dead worker's claims
        self._children = Children(
            "worker",
            "worker",
            settings.node.workers,
            _work,
            (settings,),
            on_change,
            nudged=True,
            on_death=self._free_claims_of,
        )

    def _free_claims_of(self, pid: int) -> None:
        """A worker that died held its jobs' claims: freed at once, so they are taken over
        now rather than after `node.lease_s`."""
        freed = free_claims(self.database, node_name(self.settings.node), pid=pid)
        log.info("worker.claims_freed", pid=pid, rows=freed)

    def start(self) -> None:
        self._children.start()
        log.info("worker.processes", processes=self.settings.node.workers)

    def nudge(self) -> None:
        self._children.nudge()

    @property
    def pids(self) -> list[int]:
        return self._children.pids

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM: each worker lets its stages finish the job in hand (as the node's own
        conveyor does on stop), frees its claims and exits."""
        self._children.stop(timeout_s)


def _work(settings: Settings, link: Link, number: int) -> None:
    """A worker process: run infer and encode until SIGTERM or the node's death."""
    logs.configure()
    database = Database(settings.database_url)
    claims = worker_for(database, settings.node, role="worker")
    claims.start()
    engines = load_engines(
        settings.engines.dir,
        settings.engines,
        limits=settings.limits,
        plan_cache=settings.storage.data_dir / "plans",
        intra_op_threads=intra_op_threads(settings.node.workers),
    )
    conveyor = Conveyor(cpu_stages(settings, database, engines))

    def changed() -> None:
        conveyor.nudge()
        link.wake_the_node()

    database.on_change = changed
    link.on_nudge(conveyor.nudge)
    conveyor.start()
    link.wake_the_node()  # the first byte says it is working
    if not link.serve_until_stopped():
        # The node was killed: nothing will wait for us. What we hold is taken over after
        # its lease, as for a killed node.
        log.error("worker.node_gone", worker=number)
        os._exit(1)
    conveyor.stop()
    claims.stop()
