"""The node's DICOM port: every DIMSE service it serves, in its own process or in several.

`node_services` builds what other stages serve beside receive's C-ECHO, C-STORE and MPPS:
the UPS worklist, Storage Commitment answers (N-EVENT-REPORT) and Query/Retrieve. All their
state is in the database (and `cadnode.core.locks` for their read-modify-writes), so any process
can serve any of them.

With `dicom.receivers: 1` receive runs in the node's process (the default, `auto`, does so
only on a one-CPU machine: cadnode/core/config.py `automatic_receivers`). With N > 1 one
Python process would hold the interpreter lock for every association at once, so the node
binds the port once and starts N receiver processes (`spawn`: forking a process that runs
threads is unsafe) that accept on that same listening socket; the kernel hands each
connection to one of them, whichever is free to accept it first. The node's process does
not accept: it keeps the stages, the admin port and the socket, so a receiver that dies is
restarted on the same socket without a connection in the backlog being dropped (separate
SO_REUSEPORT sockets would drop a dead one's backlog, and let another program of the same
user bind the port too).

The receivers are kept as the node keeps all its child processes (cadnode/core/children.py):
a receiver wakes the node's stages through a pipe (one byte per committed change), one that
dies is restarted, SIGTERM to the node drains every receiver (each finishes its associations
within `dicom.drain_timeout_s`) before the stages stop, and a receiver whose node has gone
(SIGKILL) closes the port and exits within a fraction of a second.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import structlog

from cadnode.core import logs
from cadnode.core.children import Children, Link
from cadnode.core.claims import free_claims, node_name, worker_for
from cadnode.core.config import Settings
from cadnode.core.db import Database
from cadnode.deliver.commitment import CommitmentScp
from cadnode.dicom.services import Service
from cadnode.ingest.receive import Receiver
from cadnode.ingest.spool import Spool
from cadnode.prioritize import ups_services
from cadnode.serve import QueryRetrieveScp

log = structlog.get_logger("cadnode.port")

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


class ReceiverProcesses:
    """N receiver processes on one listening socket; the same interface as `Receiver`."""

    def __init__(self, settings: Settings, database: Database, on_change: Callable[[], None]):
        self.settings = settings
        self.database = database
        self._listening: socket.socket | None = None
        self._on_change = on_change
        self._children: Children | None = None

    def _forget(self, pid: int) -> None:
        """A receiver that died: its heartbeat (and any claim) goes with it."""
        free_claims(self.database, node_name(self.settings.node), pid=pid)

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
        self._children = Children(
            "receive",
            "receiver",
            dicom.receivers,
            _receive,
            (self.settings, self._listening),
            self._on_change,
            on_death=self._forget,
        )
        self._children.start()
        self._listening.listen(BACKLOG)
        log.info("receive.processes", processes=dicom.receivers, port=port)
        return port

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """SIGTERM each receiver (it drains its associations), wait, then close the socket."""
        drain = self.settings.dicom.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self._children is not None:
            self._children.stop(drain)
        if self._listening is not None:
            self._listening.close()


def _bound(bind: str, port: int) -> socket.socket:
    """The port, bound but not yet listening: until every receiver is up, peers are refused
    (as by a node not started) rather than queued for whichever receiver starts first."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    bound = socket.socket(family, socket.SOCK_STREAM)
    # As pynetdicom sets it: a restart binds while the last run's connections linger.
    bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    bound.bind((bind, port))
    return bound


def _receive(settings: Settings, listening: socket.socket, link: Link, number: int) -> None:
    """A receiver process: serve on the node's socket until SIGTERM or the node's death."""
    logs.configure()
    database = Database(settings.database_url)
    database.on_change = link.wake_the_node
    receiver = receiver_in_process(settings, database, link.wake_the_node)
    port = receiver.start(listening)
    presence = worker_for(database, settings.node, role="receiver")  # its heartbeat
    presence.dicom_port, presence.associations = port, receiver.open_associations
    presence.start()
    link.wake_the_node()  # the first byte says it is accepting
    if not link.serve_until_stopped():
        log.error("receive.node_gone", receiver=number)
        receiver.stop(drain_timeout_s=0)
        os._exit(1)
    receiver.stop()
    presence.stop()
