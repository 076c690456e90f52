from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.dicom_validation import require_tool
from tests.peers import REPO


@pytest.mark.parametrize(
    ("unit", "installed_as"),
    [
        ("cadnode.service", "cadnode.service"),
        # The template for extra nodes, checked as one of its instances (a node named node2).
        ("cadnode-worker@.service", "cadnode-worker@node2.service"),
    ],
)
def test_the_unit_file_verifies_once_installed_where_it_says(
    tmp_path: Path, unit: str, installed_as: str
) -> None:
    """systemd-analyze checks syntax, directives and that every command exists."""
    tool = require_tool("systemd-analyze")
    text = (REPO / "systemd" / unit).read_text()
    assert "ExecStart=/opt/cadnode/.venv/bin/cadnode serve" in text
    installed = tmp_path / installed_as
    installed.write_text(text.replace("/opt/cadnode", str(REPO)))
    done = subprocess.run(
        [tool, "verify", str(installed)], capture_output=True, text=True, timeout=60, check=False
    )
    name = unit.split("@")[0]
    problems = [line for line in (done.stdout + done.stderr).splitlines() if name in line]
    assert done.returncode == 0 and problems == [], done.stdout + done.stderr


def test_the_node_template_names_each_node_by_its_instance() -> None:
    text = (REPO / "systemd" / "cadnode-worker@.service").read_text()
    assert "Environment=CADNODE_CONFIG=/etc/cadnode/nodes/%i.yaml" in text
    assert "EnvironmentFile=/etc/cadnode/nodes/%i.env" in text  # the database URL, kept apart
