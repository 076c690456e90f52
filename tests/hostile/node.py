"""A real node for the attacks: `cadnode serve` on the shipped engines and rules, with the
configuration sections a test changes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.peers import REPO, Cadnode, run_cadnode


@contextmanager
def attacked_node(folder: Path, **sections: dict[str, Any]) -> Iterator[Cadnode]:
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        **sections,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cadnode.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    with run_cadnode(folder, None, CADNODE_CONFIG=str(path)) as node:
        yield node
