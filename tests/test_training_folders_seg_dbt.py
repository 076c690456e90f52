"""`cadnode-train build segmenter|dbt --data DIR`: each dataset layout (SIIM-ACR, Montgomery,
Shenzhen, Duke BCS-DBT) written by the phantom generator, trained a few steps streamed from
disk, built, verified, and run by the node's own engine; a Duke folder whose right views need
Duke's flip trains, scores and builds exactly as the same volumes stored upright."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from cadnode.core.config import EngineSettings, LimitsSettings
from cadnode.infer import catalogue
from cadnode.infer.answers import DetectAnswer, SegmentAnswer
from cadnode.infer.bundle import Bundle
from cadnode.infer.runtime import Engine
from training.cli import main
from training.datasets import DUKE_BOXES, DUKE_LABELS, DUKE_PATHS, duke_flip_needed
from training.streaming import METRICS_CSV

SEGMENTER = """name: cxr-segmenter
version: 0.0.0-test
seed: 7
threads: 1
phantom_size: 64
input_size: 32
splits:
  train: {count: 8, first_seed: 1000}
  validation: {count: 4, first_seed: 2000}
  test: {count: 4, first_seed: 3000}
model:
  channels: [4, 8]
  strides: [2]
  residual_units: 0
training:
  epochs: 2
  batch_size: 2
  learning_rate: 0.01
date: "2026-01-01"
"""
DBT = """name: dbt-detector
version: 0.0.0-test
seed: 7
threads: 1
slices: 8
phantom_size: 64
input_size: 64
min_distance_px: 10
splits:
  train: {count: 4, first_seed: 1000}
  validation: {count: 4, first_seed: 2000}
  test: {count: 4, first_seed: 3000}
model:
  stem: 4
  growth: 4
  blocks: [1, 1, 1]
  anchor: 10
training:
  epochs: 2
  batch_size: 4
  learning_rate: 0.001
  patience: 25
date: "2026-01-01"
inference:
  min_score: 0.001
"""
LIMITS = LimitsSettings()


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def chest_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Films with a pneumothorax on most of them: SIIM's U-Net trains on positives only."""
    out = tmp_path_factory.mktemp("chest")
    argv = ["phantoms", "--kind", "cxr", "--count", "24", "--out", str(out / "data")]
    assert main([*argv, "--size", "64", "--seed", "6000", "--positive-fraction", "0.9"]) == 0
    (out / "segmenter.yaml").write_text(SEGMENTER)
    return out


def build(config: Path, data: Path, out: Path, run: Path, *extra: str) -> Bundle:
    argv = ["build", "--config", str(config), "--data", str(data), "--out", str(out)]
    assert main([argv[0], *extra, *argv[1:], "--workers", "1", "--run-dir", str(run)]) == 0
    return Bundle(out)


def verified(engines: Path) -> None:
    """`cadnode engines verify`: the bundle's hash, a sample inference through the daemon's
    own engine call, its output's shape and range."""
    said: list[str] = []
    settings = EngineSettings(dir=engines, backend="onnxruntime")
    assert catalogue.verify(settings, limits=LIMITS, say=said.append) == 0, said


def node_engine(bundle: Bundle) -> Engine:
    return Engine(bundle, max_decoded_bytes=LIMITS.max_decoded_image_bytes, intra_op_threads=1)


SEGMENTER_LAYOUTS = {
    "siim": ("data", ["pneumothorax"]),
    "montgomery": ("data/montgomery", ["right_lung", "left_lung"]),
    "shenzhen": ("data/shenzhen", ["right_lung", "left_lung"]),
}


@pytest.mark.integration  # trains and builds a model: seconds
@pytest.mark.parametrize("layout", sorted(SEGMENTER_LAYOUTS))
def test_segmenter_builds_from_each_layout(chest_folder: Path, layout: str) -> None:
    folder, labelled = SEGMENTER_LAYOUTS[layout]
    engines, run = chest_folder / f"engines-{layout}", chest_folder / f"run-{layout}"
    bundle = build(
        chest_folder / "segmenter.yaml",
        chest_folder / folder,
        engines / "cxr-segmenter",
        run,
        "segmenter",
        "--layout",
        layout,
        "--folds",
        "4",
    )
    verified(engines)
    metrics = bundle.manifest.provenance.metrics
    measured = {k.removeprefix("test_dice_per_image_") for k in metrics if "per_image" in k}
    assert set(labelled) <= measured and not measured - {*labelled, *_positive(labelled)}
    card = (bundle.folder / "MODEL_CARD.md").read_text()
    assert f"--layout {layout}" in card and f"The {layout} dataset layout" in card
    lines = (run / METRICS_CSV).read_text().splitlines()
    assert lines[0] == "epoch,loss,lr,validation_dice_per_image" and len(lines) == 3
    # The node runs it on a film of the folder: one mask per label, in the film's own grid.
    film = next((chest_folder / "data").glob("*.dcm"))
    (answer,) = node_engine(bundle).answer([pydicom.dcmread(film)])
    assert isinstance(answer, SegmentAnswer) and len(answer.findings) == 3
    assert (answer.rows, answer.columns) == (64, 64)


def _positive(labels: list[str]) -> set[str]:
    return {"pneumothorax_positive_films"} if "pneumothorax" in labels else set()


@pytest.mark.integration
def test_duke_folder_needing_the_flip_builds_as_the_upright_one(tmp_path: Path) -> None:
    """The same phantom volumes written upright and with right views stored turned 180 degrees
    (Duke's `dcmread_image` must flip them): `build dbt --data` gives the same model and the
    same FROC from both, because training and evaluation read every volume through the flip;
    `detect` + `froc` score both alike; the node runs the bundle on a turned volume. Skip the
    flip anywhere and the turned folder's lesions no longer sit under their boxes: the
    weights, the FROC and the predictions differ."""
    (tmp_path / "dbt.yaml").write_text(DBT)
    built, scored = {}, {}
    for name, extra in (("upright", []), ("turned", ["--flip-right"])):
        data = tmp_path / name
        argv = ["phantoms", "--kind", "dbt", "--count", "24", "--out", str(data), "--seed", "90"]
        assert main([*argv, "--slices", "8", "--size", "64", *extra]) == 0
        engines = tmp_path / f"engines-{name}"
        built[name] = build(
            tmp_path / "dbt.yaml",
            data,
            engines / "dbt-detector",
            tmp_path / f"run-{name}",
            "dbt",
            "--folds",
            "3",
        )
        scored[name] = detect_and_score(built[name], data, tmp_path / f"{name}.csv")
    turned_folder = tmp_path / "turned"
    right = [row for row in _rows(turned_folder / DUKE_PATHS) if row["View"].startswith("r")]
    needing = [
        pydicom.dcmread(turned_folder / row["classic_path"])
        for row in right
        if duke_flip_needed(
            pydicom.dcmread(turned_folder / row["classic_path"]), row["View"].lower()
        )
    ]
    assert needing, "no volume of the turned folder needs the flip"
    upright, turned = built["upright"], built["turned"]
    assert upright.manifest.model.sha256 == turned.manifest.model.sha256
    assert upright.manifest.provenance.metrics == turned.manifest.provenance.metrics
    lesions = scored["turned"]["lesions"]
    assert scored["upright"] == scored["turned"] and isinstance(lesions, int) and lesions > 0
    lines = (tmp_path / "run-turned" / METRICS_CSV).read_text().splitlines()
    assert lines[0] == "epoch,loss,lr,validation_froc_sensitivity" and len(lines) == 3
    verified(tmp_path / "engines-turned")
    (answer,) = node_engine(turned).answer([needing[0]])
    assert isinstance(answer, DetectAnswer) and answer.frames == 8
    for finding in answer.findings:
        box = finding.box
        assert 0 <= box.x <= box.x + box.width <= 64 and 0 <= box.y <= box.y + box.height <= 64


def detect_and_score(bundle: Bundle, data: Path, predictions: Path) -> dict[str, object]:
    """`cadnode-train detect --file-paths` (boxes in Duke's frame), then `cadnode-train froc`."""
    argv = ["detect", "--bundle", str(bundle.folder), "--out", str(predictions)]
    assert main([*argv, "--file-paths", str(data / DUKE_PATHS)]) == 0
    argv = ["froc", "--truth", str(data / DUKE_BOXES), "--predictions", str(predictions)]
    argv += ["--labels", str(data / DUKE_LABELS), "--min-distance", "10"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    result: dict[str, object] = json.loads(out.getvalue())
    return result


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_segmenter_overlaps_match_the_in_memory_dice() -> None:
    """Dice from counted overlaps (what a streamed evaluation keeps) equals Dice of the maps."""
    from training import segmenter
    from training.metrics import dice_per_image, pooled_dice

    rng = np.random.default_rng(3)
    probabilities = rng.random((6, 3, 8, 8)).astype(np.float32)
    masks = rng.random((6, 3, 8, 8)) > 0.7
    masks[0] = False
    halves = [(probabilities[:4], masks[:4]), (probabilities[4:], masks[4:])]
    overlaps = segmenter.Overlaps.joined([segmenter.Overlaps.of(*half) for half in halves])
    at = 20
    threshold = segmenter.THRESHOLDS[at]
    for label in range(3):
        called = list(probabilities[:, label] >= threshold)
        truth = list(masks[:, label])
        assert overlaps.dice(label)[:, at].mean() == pytest.approx(dice_per_image(called, truth))
        assert overlaps.pooled(label, at) == pytest.approx(pooled_dice(called, truth))
