"""`make engines` is reproducible: the same tree builds the same bytes, in fresh processes,
whatever the day (the manifest's date is the source commit's, not the build's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the `train` extra")

from cadnode.infer.bundle import Bundle

REPOSITORY = Path(__file__).resolve().parent.parent
COMPARED = ("model.onnx", "manifest.yaml", "MODEL_CARD.md")


def build(config: Path, out: Path) -> Bundle:
    """`cadnode-train build ruleout` in a process of its own, as `make engines` runs it."""
    command = [sys.executable, "-m", "training.cli", "build", "ruleout"]
    done = subprocess.run(
        [*command, "--config", str(config), "--out", str(out)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return Bundle(out)


# The tiny config's shape, smaller still (two builds run), at the shipped difficulty and without
# a fixed date, as the shipped configs are.
CONFIG = """\
name: cxr-ruleout
version: 0.0.0-test
seed: 11
threads: 2
phantom_size: 64
input_size: 32
difficulty: default
splits:
  train: {count: 32, first_seed: 1000}
  validation: {count: 16, first_seed: 2000}
  test: {count: 16, first_seed: 3000}
model:
  channels: [4, 8]
training:
  epochs: 2
  batch_size: 16
  learning_rate: 0.01
"""


@pytest.mark.timeout(900)  # two builds in fresh processes: minutes on a loaded 2-core box
def test_two_builds_of_one_config_are_byte_identical(tmp_path: Path) -> None:
    """Two builds agree byte for byte, and the date is the source commit's."""
    config = tmp_path / "ruleout.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    out = tmp_path / "engines" / "cxr-ruleout"  # one path: the card's rebuild command names it
    first = build(config, out)
    written = {name: (out / name).read_bytes() for name in COMPARED}
    build(config, out)
    for name in COMPARED:
        assert (out / name).read_bytes() == written[name], name
    commit_date = subprocess.run(
        ["git", "log", "-1", "--format=%cs"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if commit_date:  # outside a git checkout the date is the day of the build
        assert first.manifest.provenance.date == commit_date
    card = (first.folder / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Phantom difficulty `default`" in card
    assert "measured on synthetic phantoms" in card
