"""The rules in force, replaced whole when the file changes or on SIGHUP.

A new file is validated completely before it replaces anything; the swap is one reference
assignment, so the router sees either the old rules or the new ones, never a mix, and
receiving never waits on it. A file with errors is refused with every error logged, and
the rules in force stay. Every routing decision records the version it was made with.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog

from cadnode.core import audit
from cadnode.core.db import AuditOutcome, Database
from cadnode.core.yamlfile import ConfigError
from cadnode.route.rules import RuleSet, load_rules

log = structlog.get_logger("cadnode.route")

Signature = tuple[int, int, int] | None


class LiveRules:
    def __init__(
        self,
        path: Path,
        engines: Iterable[str],
        destinations: Iterable[str] = (),
        poll_s: float = 0.5,
        database: Database | None = None,  # where rules changes are audited
        versions: Mapping[str, Collection[str]] | None = None,  # installed, by engine
    ) -> None:
        self.path = path
        self.database = database
        self.engines = list(engines)
        self.versions = versions
        self.destinations = list(destinations)
        self.poll_s = poll_s
        self._seen = _signature(path)
        # At start an invalid file is fatal (ConfigError): the node does not start on it.
        self.current: RuleSet = self._load()
        self._audit(AuditOutcome.loaded, trigger="start", version=self.current.version)
        self._requested = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def request_reload(self) -> None:
        """Ask for a reload soon; safe to call from a signal handler."""
        self._requested.set()

    def reload(self, trigger: str) -> bool:
        """Load and validate the file; swap it in if valid. True when the new rules are in force."""
        try:
            rules = self._load()
        except ConfigError as error:
            log.error(
                "rules.refused",
                trigger=trigger,
                path=str(self.path),
                problems=error.problems,
                kept_version=self.current.version,
            )
            self._audit(AuditOutcome.refused, trigger=trigger, problems=error.problems)
            return False
        previous, self.current = self.current, rules
        log.info(
            "rules.loaded" if rules.version != previous.version else "rules.unchanged",
            trigger=trigger,
            path=str(self.path),
            version=rules.version,
            previous_version=previous.version,
            rules=len(rules.rules),
        )
        if rules.version != previous.version:
            self._audit(
                AuditOutcome.loaded,
                trigger=trigger,
                version=rules.version,
                previous=previous.version,
            )
        return True

    def _audit(self, outcome: AuditOutcome, **details: Any) -> None:
        if self.database is not None:
            audit.record(
                self.database,
                audit.RULES,
                actor="node",
                outcome=outcome,
                path=str(self.path),
                **details,
            )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="rules-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._requested.set()
        if self._thread is not None:
            self._thread.join(5)

    def _load(self) -> RuleSet:
        return load_rules(self.path, self.engines, self.destinations, versions=self.versions)

    def _watch(self) -> None:
        """Reload on request, or once a changed file has stayed unchanged for one poll.

        Waiting for the file to settle keeps a half-written file (an editor saving in
        place) from being loaded, even if its first half happens to be valid.
        """
        settling: Signature = self._seen
        while not self._stopping.is_set():
            requested = self._requested.wait(self.poll_s)
            if self._stopping.is_set():
                return
            now = _signature(self.path)
            if requested:
                self._requested.clear()
                self._seen = settling = now
                self.reload("sighup")
            elif now != self._seen:
                if now == settling:
                    self._seen = now
                    self.reload("file-changed")
                settling = now


def _signature(path: Path) -> Signature:
    """What changes when the file does: a rename onto it, or a write to it."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)
