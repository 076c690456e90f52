"""Running the viewer harness's scripts (seg_load.mjs, sr_read.mjs) from the tests.

Node.js, or the harness's packages (`make viewers`), missing skips a test on a workstation and
fails it under CI, as tests/dicom_validation.py does for dciodvfy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.dicom_validation import in_ci

HARNESS = Path(__file__).resolve().parent
INSTALLED = HARNESS / "node_modules" / ".package-lock.json"  # written by `npm ci`


@dataclass(frozen=True)
class Ran:
    """What a script printed (its JSON), its exit status and its complaints."""

    status: int
    printed: Any
    stderr: str


def run_script(script: str, *arguments: Path | str) -> Ran:
    """`node <script> <arguments>` in the harness; its JSON output parsed."""
    done = subprocess.run(
        [_node(), str(HARNESS / script), *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        printed = json.loads(done.stdout) if done.stdout.strip() else None
    except json.JSONDecodeError:
        printed = None
    return Ran(done.returncode, printed, done.stderr)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        _missing("node is not on PATH (install Node.js 20 or later)")
    if not INSTALLED.exists():
        _missing(f"the viewer harness is not installed: run `make viewers` ({INSTALLED})")
    assert node is not None
    return node


def _missing(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason}; CI must load the results in the viewers, not skip", pytrace=False)
    pytest.skip(reason)
