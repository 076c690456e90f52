"""The segmenter and DBT detector builds (tiny configs), the detector's Duke-format output
through `cadnode-train froc`, and the shipped bundles re-evaluated against their cards."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset

pytest.importorskip("torch", reason="needs the `train` extra")

from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.bundle import Bundle
from cadnode.infer.phantoms.breast import VolumeCase, plan_volumes
from cadnode.infer.runtime import Engine
from training import detector, segmenter
from training.cli import main
from training.datasets import DUKE_BOXES, DUKE_LABELS, DUKE_PATHS, DukeBox
from training.evaluate import evaluate_ruleout, evaluate_segmenter
from training.export import onnx_probabilities
from training.froc import PREDICTION_HEADER, Prediction, read_predictions
from training.metrics import proportion_interval
from training.phantom_sets import store_pixels

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


def test_detect_reads_turned_duke_volumes_in_their_boxes_frame(
    tiny_detector: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Right views stored turned 180 degrees (Duke's reader flips them) give, through
    `detect --file-paths`, the boxes and the FROC of the same volumes stored upright: the
    predictions are in the frame the Duke boxes are drawn on. Read unflipped, every
    right-view box would come back mirrored (test_turned_boxes_are_mis_scored_unless_flipped)."""
    results = {}
    for name, extra in (("upright", []), ("turned", ["--flip-right"])):
        folder = tmp_path / name
        argv = ["phantoms", "--kind", "dbt", "--count", "8", "--out", str(folder), "--seed", "77"]
        assert main([*argv, "--slices", "8", "--size", "64", *extra]) == 0
        predictions = tmp_path / f"{name}.csv"
        paths = str(folder / DUKE_PATHS)
        argv = ["detect", "--bundle", str(tiny_detector.folder), "--out", str(predictions)]
        assert main([*argv, "--file-paths", paths]) == 0
        capsys.readouterr()
        truth, labels = str(folder / DUKE_BOXES), str(folder / DUKE_LABELS)
        argv = ["froc", "--truth", truth, "--predictions", str(predictions), "--labels", labels]
        assert main([*argv, "--min-distance", "10"]) == 0  # 100 px would cover a 64 px slice
        results[name] = (read_predictions(predictions), json.loads(capsys.readouterr().out))
    (upright, upright_froc), (turned, turned_froc) = results["upright"], results["turned"]
    assert any(p.view.startswith("r") for p in upright) and len(turned) == len(upright)
    for a, b in zip(sorted(upright, key=_order), sorted(turned, key=_order), strict=True):
        assert a.volume == b.volume and (a.z, a.depth) == (b.z, b.depth)
        assert abs(a.x - b.x) <= 0.2 and abs(a.y - b.y) <= 0.2 and abs(a.score - b.score) < 1e-4
    assert turned_froc == upright_froc


def _order(prediction: Prediction) -> tuple[object, ...]:
    return prediction.volume, prediction.z, round(prediction.x), round(prediction.y)


def test_detector_trains_on_turned_volumes_through_the_duke_reader() -> None:
    """Training slices of right views stored turned (and rescaled) are those of the upright
    volumes: the model learns each box on the pixels it was drawn on."""
    config = detector.load_config(CONFIGS / "dbt-tiny.yaml")
    cases = plan_volumes(range(40, 44), 1.0)

    def turned(case: VolumeCase, slices: int, size: int) -> tuple[Dataset, list[DukeBox]]:
        ds, boxes = detector.volume_truth(case, slices, size)
        if case.view.startswith("R"):
            store_pixels(ds, ds.pixel_array, turned=True, rescale=(2.0, -1000.0))
        return ds, boxes

    upright = detector.training_slices(cases, config)
    read = detector.training_slices(cases, config, render=turned)
    assert np.array_equal(read.targets, upright.targets) and read.positive.all()
    assert np.abs(read.images - upright.images).max() < 1e-3


def test_detector_positive_slices_follow_the_duke_rule() -> None:
    """round(sqrt(mean side)) slices centred on the lesion's slice, kept in the volume."""
    from training.datasets import DukeBox

    lesion = DukeBox("P", "S", "lcc", 5, 0, 0, 16, 16, "benign", 12)  # sqrt(16) = 4 slices
    assert list(detector.positive_slices(lesion, 12)) == [3, 4, 5, 6]
    edge = DukeBox("P", "S", "lcc", 0, 0, 0, 9, 9, "benign", 12)  # 3 slices, from slice 0
    assert list(detector.positive_slices(edge, 12)) == [0, 1, 2]


def test_segmenter_thresholds_are_chosen_through_the_cascade() -> None:
    """Two pneumothorax films the U-Net gets right at 0.6, three normal films where it draws
    a false 0.8 region. On all films the best Dice per image is above 0.8 (3 empty films
    right, 2 missed: 0.6); through the cascade, which rules the normal films out, every film
    is right at the lowest threshold. The lungs are never cascaded."""
    probabilities = np.zeros((5, 3, 8, 8), np.float32)
    masks = np.zeros((5, 3, 8, 8), bool)
    masks[:, :2, 2:6, 1:4] = True  # both lungs on every film (one box for both: enough here)
    probabilities[:, :2, 2:6, 1:4] = 0.9
    masks[:2, segmenter.PNEUMOTHORAX, 1:3, 1:3] = True
    probabilities[:2, segmenter.PNEUMOTHORAX, 1:3, 1:3] = 0.6
    probabilities[2:, segmenter.PNEUMOTHORAX, 5:7, 5:7] = 0.8
    ruled_out = np.array([False, False, True, True, True])
    alone = segmenter.choose_thresholds(probabilities, masks)
    cascaded = segmenter.choose_thresholds(probabilities, masks, ruled_out)
    assert alone[segmenter.PNEUMOTHORAX] == 0.81 and cascaded[segmenter.PNEUMOTHORAX] == 0.01
    assert alone[:2] == cascaded[:2] == [0.01, 0.01]


def test_segmenter_build_chooses_through_the_built_ruleout_bundle(tmp_path: Path) -> None:
    """`build segmenter` with a cascade bundle (as the Makefile builds cxr-ruleout first)
    chooses pneumothorax's threshold on the validation films through that bundle's rule-out
    decisions, and says so in the manifest."""
    ruleout = tmp_path / "cxr-ruleout"
    build("ruleout", "ruleout-tiny.yaml", ruleout)
    config_path = tmp_path / "segmenter.yaml"
    text = (CONFIGS / "segmenter-tiny.yaml").read_text(encoding="utf-8")
    config_path.write_text(text + f"cascade: {{bundle: {ruleout}}}\n", encoding="utf-8")
    built = build("segmenter", str(config_path), tmp_path / "seg")
    config = segmenter.load_config(config_path)
    cases = segmenter.split_cases(config)["validation"]
    images, masks = segmenter.tensors(cases, config.phantom_size, config.input_size, "v")
    probabilities = onnx_probabilities(built.model_path, images, threads=2, batch_size=16)
    ruled_out = segmenter.ruled_out_by(ruleout, cases, config.phantom_size)
    assert ruled_out is not None
    expected = segmenter.choose_thresholds(probabilities, masks, ruled_out)
    points = built.manifest.operating_points
    assert [points[label.name].threshold for label in segmenter.LABELS] == expected
    assert "after the cascade" in (points["pneumothorax"].description or "")


# --- the shipped demo engines against their own model cards ------------------------------------
# Fresh phantoms (seeds in no split) are a new sample: a card's figure must hold on it within
# these tolerances (about two standard errors of the small fresh sets).
RULEOUT_TOLERANCE = {"test_auc": 0.05}
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
    films = 80
    measured = evaluate_ruleout(bundle, range(960_000, 960_000 + films))
    assert card_states(bundle, claims["test_auc"])
    assert abs(measured["test_auc"] - claims["test_auc"]) <= RULEOUT_TOLERANCE["test_auc"]
    for kind in ("sensitivity", "specificity"):
        # The claim inside the exact 95 % interval of the fresh count (half the films are
        # abnormal): at `default` difficulty the points are no longer saturated, and 40 films
        # vary by more than a fixed tolerance.
        name, per_class = f"test_{kind}_at_rule_out", films // 2
        low, high = proportion_interval(round(measured[name] * per_class), per_class)
        assert low <= claims[name] <= high, (name, measured)


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
