"""What the admin port reads from the running node, handed over by the daemon at start.

Everything else it shows comes from the database, as every stage writes it there.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cadnode.core.config import Settings
from cadnode.core.db import Database, utcnow
from cadnode.infer.bundle import Bundle
from cadnode.route import RuleSet

if TYPE_CHECKING:  # loading ONNX Runtime is the daemon's business, not every command's
    from cadnode.infer.runtime import Engine


@dataclass(frozen=True)
class EngineInfo:
    name: str
    version: str
    task: str
    sha256: str
    backend: str
    folder: Path
    description: str

    @classmethod
    def of(cls, bundle: Bundle, backend: str) -> EngineInfo:
        manifest = bundle.manifest
        return cls(
            name=manifest.name,
            version=manifest.version,
            task=manifest.task.value,
            sha256=bundle.sha256,
            backend=backend,
            folder=bundle.folder,
            description=manifest.description,
        )

    @classmethod
    def of_loaded(cls, engines: Iterable[Engine]) -> list[EngineInfo]:
        """From the engines the node loaded: their bundle and the backend each runs on."""
        return [cls.of(engine.bundle, engine.backend.name) for engine in engines]


@dataclass
class AdminContext:
    settings: Settings
    database: Database
    # The engines whose bundles the engines folder holds, and those the node has loaded.
    configured_engines: list[str]
    engines: list[EngineInfo]
    rules: Callable[[], RuleSet]  # the rules in force now
    started_at: dt.datetime = field(default_factory=utcnow)
    # (device, inode) of the database file as the node opened it: /readyz says not ready
    # once the path names another file (deleted, or replaced under the running node).
    database_file: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.database_file is None and self.database.file is not None:  # None: PostgreSQL
            self.database_file = file_identity(self.database.file)


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino
