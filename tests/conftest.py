from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cadnode import logs
from cadnode.db import Database

logs.configure()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    yield Database(tmp_path / "cadnode.db")
