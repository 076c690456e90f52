"""The daemon: load and check everything, then wire the stages together and serve.

Everything that can be wrong in configuration, rules or engines is found here, before the
node accepts its first association.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import structlog

from cadnode.admin.app import AdminServer
from cadnode.admin.context import AdminContext, EngineInfo
from cadnode.core import audit
from cadnode.core.claims import worker_for
from cadnode.core.config import Settings
from cadnode.core.db import AuditOutcome, Database
from cadnode.core.runner import Conveyor
from cadnode.core.tallies import Compactor
from cadnode.deliver.dispatch import Dispatcher
from cadnode.deliver.outbox import rename_legacy_destinations
from cadnode.dicom.indexing import Indexer
from cadnode.feedback import report_listener
from cadnode.infer import releases
from cadnode.infer.bundle import discover
from cadnode.infer.runtime import installed_versions, load_engines
from cadnode.ingest.assemble import Assembler
from cadnode.ingest.receive import Receiver
from cadnode.port import ReceiverProcesses, receiver_in_process
from cadnode.prioritize import Prioritization
from cadnode.retain import Housekeeper
from cadnode.route import LiveRules, Router
from cadnode.watch import Watchdog
from cadnode.workers import WorkerProcesses, cpu_stages

log = structlog.get_logger("cadnode.daemon")


class Node:
    def __init__(self, settings: Settings) -> None:
        storage = settings.storage
        self.database = Database(settings.database_url)
        # This process as a claimer of work, before any stage claims (cadnode/core/claims.py).
        self.presence = worker_for(self.database, settings.node)
        # Rows queued before deliveries named their destination get its name (idempotent).
        rename_legacy_destinations(self.database, settings.destinations)
        engines = load_engines(
            settings.engines.dir,
            settings.engines,
            limits=settings.limits,
            plan_cache=storage.data_dir / "plans",
        )
        for engine in engines.values():
            audit.record(
                self.database,
                audit.ENGINE,
                actor="node",
                outcome=AuditOutcome.loaded,
                engine=engine.name,
                version=engine.manifest.version,
                sha256=engine.bundle.sha256,
                backend=engine.backend.name,
            )
        # Several versions of an engine may be loaded; which is live is the release table's
        # (cadnode/infer/releases.py), read as each job is routed.
        versions = installed_versions(engines.values())
        releases.record_defaults(self.database, versions)
        self.rules = LiveRules(
            settings.rules,
            versions,
            settings.destinations,
            database=self.database,
            versions=versions,
        )
        self.priority = Prioritization(settings, self.database)
        self.housekeeping = Housekeeper(self.database, storage, settings.retention)
        router = Router(
            self.database, storage.spool, self.rules, settings.destinations, versions=versions
        )
        # Infer and encode: here, or in `node.workers` processes (cadnode/workers.py).
        in_workers = settings.node.workers > 1
        cpu_bound = [] if in_workers else cpu_stages(settings, self.database, engines)
        self.conveyor = Conveyor(
            [
                Assembler(
                    self.database,
                    settings.assemble,
                    rule_quiet_periods=True,
                    indexer=Indexer(storage.spool, storage.results),
                ),
                router,
                *cpu_bound,
                Dispatcher(
                    self.database,
                    storage.results,
                    settings.dispatch,
                    settings.dicom.ae_title,
                    spool=storage.spool,
                    destinations=settings.destinations,
                ),
                *self.priority.stages,
                self.housekeeping,  # retention: removes what the policy allows (cadnode/retain)
                Watchdog(self.database, settings),  # alerts on stalls (cadnode/watch)
                Compactor(self.database.engine),  # PostgreSQL: metrics' changes folded in
            ]
        )
        self.workers = WorkerProcesses(settings, self.database, self.nudge) if in_workers else None
        self.database.on_change = self.nudge
        # The DICOM port, with every stage's DIMSE services on it (cadnode/port.py): in
        # this process, or in `dicom.receivers` processes that wake the stages here.
        self.receiver: Receiver | ReceiverProcesses = (
            ReceiverProcesses(settings, self.database, self.nudge)
            if settings.dicom.receivers > 1
            else receiver_in_process(settings, self.database, self.nudge)
        )
        # Radiologists' reports (HL7 ORU over MLLP), when `feedback.mllp.enabled`; the
        # findings file is checked here either way (the dashboard and the API read it).
        self.reports = report_listener(settings.feedback, self.database)
        self.admin = AdminServer(
            AdminContext(
                settings=settings,
                database=self.database,
                configured_engines=sorted(discover(settings.engines.dir)),
                engines=EngineInfo.of_loaded(engines.values()),
                rules=lambda: self.rules.current,
            )
        )
        log.info(
            "node.configured",
            engines=sorted(engines),
            rules_version=self.rules.current.version,
            priority_policy_version=self.priority.policy.version,
            destinations=[str(d) for d in settings.result_destinations()],
            data_dir=str(storage.data_dir),
        )

    def start(self) -> int:
        # Removals a kill cut short are finished first, so reconciling never indexes again a
        # spool file whose row housekeeping had already deleted (cadnode/retain/removal.py).
        self.presence.start(fresh_node=True)  # claims of this node's earlier life: free now
        self.housekeeping.recover()
        self.receiver.reconcile()  # spool and index agree before any stage or peer sees them
        self.rules.start()
        self.conveyor.start()
        if self.workers is not None:
            self.workers.start()
        self.admin.start()
        if self.reports is not None:
            self.reports.start()
        port = self.receiver.start()
        self.presence.dicom_port = port
        if isinstance(self.receiver, Receiver):  # receiver processes beat on their own
            self.presence.associations = self.receiver.open_associations
        return port

    def nudge(self) -> None:
        """A change committed here, in a receiver or in a worker: every stage looks again."""
        self.conveyor.nudge()
        if self.workers is not None:
            self.workers.nudge()

    def stop(self) -> None:
        """Drain: refuse new associations and let running ones finish (dicom.drain_timeout_s),
        then let each stage finish the job in hand; a job left unfinished stays in its state
        and is picked up again at the next start."""
        self.receiver.stop()
        if self.workers is not None:
            self.workers.stop()
        self.conveyor.stop()
        self.presence.stop()
        self.rules.stop()
        if self.reports is not None:
            self.reports.stop()
        self.admin.stop()
        log.info("node.stopped")


def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then stop receiving and let the stages finish.

    SIGHUP reloads the rules (as a change to the rules file does): valid rules replace the
    ones in force, an invalid file is refused and logged.
    """
    node = Node(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("node.signal", signal=signal.Signals(signum).name)
        stop.set()

    def on_hangup(signum: int, _frame: FrameType | None) -> None:
        log.info("node.signal", signal=signal.Signals(signum).name)
        node.rules.request_reload()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    node.start()
    stop.wait()
    node.stop()
