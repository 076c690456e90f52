from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cadnode.core import logs
from cadnode.core.db import Database

# Loggers not cached, so every test's structlog.testing.capture_logs sees every event.
logs.configure(cache_loggers=False)


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    yield Database(tmp_path / "cadnode.core.db")
