"""The daemon: load and check everything, then wire the stages together and serve.

Everything that can be wrong in configuration, rules or engines is found here, before the
node accepts its first association.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import structlog

from cadnode.admin import AdminServer
from cadnode.assemble import Assembler
from cadnode.config import Settings
from cadnode.conveyor import Conveyor
from cadnode.db import Database
from cadnode.dispatch import Dispatcher
from cadnode.encode.stage import Encoder
from cadnode.infer.runtime import load_engines
from cadnode.infer.stage import Inference
from cadnode.receive import Receiver
from cadnode.route import Router, load_rules

log = structlog.get_logger("cadnode.daemon")


class Node:
    def __init__(self, settings: Settings) -> None:
        storage = settings.storage
        self.database = Database(storage.database)
        engines = load_engines(settings.engines.dir)
        rules = load_rules(settings.rules, engines)
        self.conveyor = Conveyor(
            [
                Assembler(self.database, settings.assemble.quiet_period_s),
                Router(self.database, storage.spool, rules),
                Inference(self.database, storage.spool, engines),
                Encoder(
                    self.database, storage.spool, storage.results, settings.result_destinations()
                ),
                Dispatcher(
                    self.database, storage.results, settings.dispatch, settings.dicom.ae_title
                ),
            ]
        )
        self.database.on_change = self.conveyor.nudge
        self.receiver = Receiver(settings, self.database, on_indexed=self.conveyor.nudge)
        self.admin = AdminServer(settings.http)
        log.info(
            "node.configured",
            engines=sorted(engines),
            rules_version=rules.version,
            destinations=[str(d) for d in settings.result_destinations()],
            data_dir=str(storage.data_dir),
        )

    def start(self) -> int:
        self.conveyor.start()
        self.admin.start()
        return self.receiver.start()

    def stop(self) -> None:
        self.receiver.stop()
        self.conveyor.stop()
        self.admin.stop()
        log.info("node.stopped")


def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then stop receiving and let the stages finish."""
    node = Node(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("node.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    stop.wait()
    node.stop()
