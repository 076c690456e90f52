from __future__ import annotations

import subprocess
from pathlib import Path

from tests.dicom_validation import require_tool
from tests.peers import REPO


def test_the_unit_file_verifies_once_installed_where_it_says(tmp_path: Path) -> None:
    """systemd-analyze checks syntax, directives and that every command exists."""
    tool = require_tool("systemd-analyze")
    unit = (REPO / "systemd" / "cadnode.service").read_text()
    assert "ExecStart=/opt/cadnode/.venv/bin/cadnode serve" in unit
    installed = tmp_path / "cadnode.service"
    installed.write_text(unit.replace("/opt/cadnode", str(REPO)))
    done = subprocess.run(
        [tool, "verify", str(installed)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = [
        line for line in (done.stdout + done.stderr).splitlines() if "cadnode.service" in line
    ]
    assert done.returncode == 0 and problems == [], done.stdout + done.stderr
