from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.peers import REPO


def cadnode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cadnode.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_check_accepts_the_shipped_configuration() -> None:
    done = cadnode("check")
    assert done.returncode == 0, done.stderr
    assert "configuration OK: 4 engine(s), 3 rule(s)" in done.stdout


def test_rules_check_lists_every_problem_with_its_line_and_exits_2(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: a\n    match: {Modalty: DX}\n    action: infer\n"
        "    pipeline: [cxr-ruleout]\n  - name: b\n    action: sing\n"
    )
    done = cadnode("rules", "check", str(rules))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{rules}:3:13: rules.0.match.Modalty:")
    assert lines[1].startswith(f"{rules}:7:5: rules.1.action:")


def test_a_bad_configuration_stops_serve_before_it_listens(tmp_path: Path) -> None:
    config = tmp_path / "cadnode.yaml"
    config.write_text("dicom:\n  port: 70000\n")
    done = cadnode("serve", env={"CADNODE_CONFIG": str(config)})
    assert done.returncode == 2
    assert f"{config}:2:3: dicom.port:" in done.stderr


def test_studies_on_an_empty_node_prints_the_header(tmp_path: Path) -> None:
    done = cadnode("studies", env={"CADNODE_DATA_DIR": str(tmp_path)})
    assert done.returncode == 0
    assert done.stdout.split()[:3] == ["JOB", "VER", "STATE"]


def test_commands_and_the_node_start_without_the_libraries_only_some_work_needs() -> None:
    """scipy (a second) and numba (via ensemble_boxes, 0.3 s) are imported where drift,
    intervals, components and DBT fusion are computed, not by every command or node start."""
    probe = (
        "import sys, cadnode.cli, cadnode.daemon;"
        "print(sorted(m for m in ('scipy.stats', 'scipy.ndimage', 'numba', 'ensemble_boxes')"
        " if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
