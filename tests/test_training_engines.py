"""The segmenter and DBT detector builds (tiny configs), the detector's Duke-format output
through `cadnode-train froc`, and the shipped bundles re-evaluated against their cards."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the `train` extra")

from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.bundle import Bundle
from cadnode.infer.runtime import Engine
from training import detector, segmenter
from training.cli import main
from training.evaluate import evaluate_ruleout, evaluate_segmenter
from training.froc import PREDICTION_HEADER

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"
ENGINES = Path(__file__).resolve().parent.parent / "engines"


def build(engine: str, config: str, out: Path) -> Bundle:
    assert main(["build", engine, "--config", str(CONFIGS / config), "--out", str(out)]) == 0
    return Bundle(out)


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build("segmenter", "segmenter-tiny.yaml", tmp_path_factory.mktemp("s") / "seg")


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build("dbt", "dbt-tiny.yaml", tmp_path_factory.mktemp("d") / "dbt-detector")


def test_segmenter_bundle(tiny_segmenter: Bundle) -> None:
    manifest = tiny_segmenter.manifest
    assert manifest.task == "segment" and manifest.cascade is not None
    assert manifest.cascade.after == "cxr-ruleout"
    assert [(label.name, label.code.value) for label in manifest.labels] == [
        ("right_lung", "3341006"),
        ("left_lung", "44029006"),
        ("pneumothorax", "36118008"),
    ]
    assert manifest.labels[2].category is not None
    assert manifest.labels[2].category.value == "49755003"
    assert set(manifest.operating_points) == {"right_lung", "left_lung", "pneumothorax"}
    assert manifest.output is not None and manifest.output.shape[1] == "label"
    metrics = manifest.provenance.metrics
    assert 0 <= metrics["test_dice_per_image_pneumothorax"] <= 1
    assert "test_dice_per_image_pneumothorax" in manifest.provenance.confidence_intervals
    size = manifest.preprocessing.size
    engine = Engine(
        tiny_segmenter, max_decoded_bytes=DEFAULT_LIMIT
    )  # what the daemon does at start: load and warm up
    maps = engine._run(np.zeros((2, 1, size, size), np.float32))
    assert maps.shape == (2, 3, size, size) and 0 <= maps.min() <= maps.max() <= 1
    card = (tiny_segmenter.folder / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "not for clinical use" in card and "Dice per image" in card
    assert (tiny_segmenter.folder / "calibration.png").stat().st_size > 0


def test_detector_bundle_and_duke_round_trip(
    tiny_detector: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tiny_detector.manifest
    assert manifest.task == "detect" and manifest.model.output == "boxes"
    assert manifest.labels[0].code.value == "129788004"
    assert manifest.output is not None and manifest.output.fields == detector.FIELDS
    assert manifest.output.parameters["cell"] == 16 and "report" in manifest.operating_points
    assert "test_lesion_sensitivity_at_2_fp" in manifest.provenance.metrics
    assert (tiny_detector.folder / "froc.png").stat().st_size > 0
    size = manifest.preprocessing.size
    boxes = Engine(tiny_detector, max_decoded_bytes=DEFAULT_LIMIT)._run(
        np.zeros((3, 1, size, size), np.float32)
    )
    assert boxes.shape == (3, (size // 16) ** 2, 5)

    volumes = tmp_path / "volumes"
    argv = ["phantoms", "--kind", "dbt", "--count", "4", "--out", str(volumes), "--seed", "77"]
    assert main([*argv, "--slices", "8", "--size", "64"]) == 0
    predictions = tmp_path / "predictions.csv"
    files = [str(p) for p in sorted(volumes.glob("*.dcm"))]
    bundle = str(tiny_detector.folder)
    assert main(["detect", "--bundle", bundle, "--out", str(predictions), *files]) == 0
    with predictions.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and list(rows[0]) == list(PREDICTION_HEADER)
    assert {row["View"] for row in rows} <= {"lcc", "rcc", "lmlo", "rmlo"}
    assert all(0 <= int(row["Z"]) < 8 and int(row["Depth"]) >= 1 for row in rows)
    capsys.readouterr()
    truth = str(volumes / "BCS-DBT-boxes.csv")
    labels = str(volumes / "BCS-DBT-labels.csv")
    argv = ["froc", "--truth", truth, "--predictions", str(predictions), "--labels", labels]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["volumes"] == 4 and set(result) >= {"lesion_based", "breast_based"}


def test_detector_positive_slices_follow_the_duke_rule() -> None:
    """round(sqrt(mean side)) slices centred on the lesion's slice, kept in the volume."""
    from training.datasets import DukeBox

    lesion = DukeBox("P", "S", "lcc", 5, 0, 0, 16, 16, "benign", 12)  # sqrt(16) = 4 slices
    assert list(detector.positive_slices(lesion, 12)) == [3, 4, 5, 6]
    edge = DukeBox("P", "S", "lcc", 0, 0, 0, 9, 9, "benign", 12)  # 3 slices, from slice 0
    assert list(detector.positive_slices(edge, 12)) == [0, 1, 2]


# --- the shipped demo engines against their own model cards ------------------------------------
# Fresh phantoms (seeds in no split) are a new sample: a card's figure must hold on it within
# these tolerances (about two standard errors of the small fresh sets).
RULEOUT_TOLERANCE = {"test_auc": 0.05, "sensitivity": 0.1, "specificity": 0.1}
DICE_TOLERANCE = {"lung": 0.03, "pneumothorax": 0.1}
FROC_TOLERANCE = 0.25


def shipped(name: str) -> Bundle:
    folder = ENGINES / name
    assert (folder / "manifest.yaml").exists(), f"{folder} is missing: run `make engines`"
    return Bundle(folder)


def card_states(bundle: Bundle, value: float) -> bool:
    return f"{value:.4f}" in (bundle.folder / "MODEL_CARD.md").read_text(encoding="utf-8")


def test_shipped_ruleout_holds_its_card() -> None:
    bundle = shipped("cxr-ruleout")
    claims = bundle.manifest.provenance.metrics
    measured = evaluate_ruleout(bundle, range(960_000, 960_080))
    assert card_states(bundle, claims["test_auc"])
    assert abs(measured["test_auc"] - claims["test_auc"]) <= RULEOUT_TOLERANCE["test_auc"]
    for kind in ("sensitivity", "specificity"):
        name = f"test_{kind}_at_rule_out"
        assert abs(measured[name] - claims[name]) <= RULEOUT_TOLERANCE[kind], (name, measured)


def test_shipped_segmenter_holds_its_card() -> None:
    bundle = shipped("cxr-segmenter")
    claims = bundle.manifest.provenance.metrics
    measured = evaluate_segmenter(bundle, range(970_000, 970_040))
    for label in segmenter.LABELS:
        name = f"test_dice_per_image_{label.name}"
        assert card_states(bundle, claims[name])
        tolerance = DICE_TOLERANCE["lung" if "lung" in label.name else "pneumothorax"]
        assert abs(measured[name] - claims[name]) <= tolerance, (name, measured[name], claims)


def test_shipped_detector_holds_its_card(capsys: pytest.CaptureFixture[str]) -> None:
    bundle = shipped("dbt-detector")
    claim = bundle.manifest.provenance.metrics["test_lesion_sensitivity_at_2_fp"]
    argv = ["evaluate", "dbt", "--bundle", str(bundle.folder), "--count", "32"]
    assert main([*argv, "--seed", "980000"]) == 0
    report = json.loads(capsys.readouterr().out)
    measured = report["test_lesion_sensitivity_at_2_fp"]
    assert measured["manifest"] == claim
    assert abs(measured["measured"] - claim) <= FROC_TOLERANCE, report
    assert f"{claim:.3f}" in (bundle.folder / "MODEL_CARD.md").read_text(encoding="utf-8")
