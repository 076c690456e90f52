"""The training module: a tiny cxr-ruleout build end to end, phantoms, calibration, export."""

from __future__ import annotations

import csv
import shutil
import subprocess
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the `train` extra")

import onnxruntime as ort
import pydicom
import torch
from PIL import Image

from cadnode.core.yamlfile import ConfigError
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.bundle import Bundle
from cadnode.infer.phantoms.chest import Case, make_chest_phantom, plan_cases, render
from cadnode.infer.preprocess import image_to_tensor
from training.bundle import code_revision, revision_caveat
from training.cli import main
from training.experiments import batch_control
from training.export import ExportMismatch, check_against_torch, export_onnx
from training.ruleout import (
    RuleoutNet,
    TrainSpec,
    auc,
    calibrate,
    class_prior,
    controlled_batches,
    epoch_batches,
    evaluate,
    load_config,
    prior_thresholded,
    rates,
    steps_per_epoch,
)

TINY = Path(__file__).resolve().parent.parent / "training" / "configs" / "ruleout-tiny.yaml"


def build(out: Path) -> Path:
    assert main(["build", "ruleout", "--config", str(TINY), "--out", str(out)]) == 0
    return out


def probabilities(bundle: Bundle, cases: list[Case], phantom_size: int) -> np.ndarray:
    """What the daemon would compute: render, image_to_tensor, ONNX Runtime."""
    size = bundle.manifest.preprocessing.size
    images = np.stack(
        [
            image_to_tensor(render(case, phantom_size), size, limit=DEFAULT_LIMIT)[0]
            for case in cases
        ]
    )
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    return session.run([bundle.manifest.model.output], {bundle.manifest.model.input: images})[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("engines") / "cxr-ruleout")


def test_tiny_build_writes_a_verified_bundle(tiny: Path) -> None:
    bundle = Bundle(tiny)
    manifest = bundle.manifest
    config = load_config(TINY)
    assert manifest.name == "cxr-ruleout" and manifest.task == "classify"
    assert manifest.inputs.modalities == ["CR", "DX"] and manifest.inputs.views == ["PA", "AP"]
    assert manifest.preprocessing.size == config.input_size
    assert [(label.name, label.code.value) for label in manifest.labels] == [
        ("abnormal", "263654008")
    ]
    assert (manifest.model.input, manifest.model.output) == ("image", "probability")
    assert "not for clinical use" in manifest.provenance.intended_use
    assert "test: 40 films, seeds 3000-3039" in manifest.provenance.training_data
    assert 0 <= manifest.provenance.metrics["test_auc"] <= 1
    train = plan_cases(config.splits.train.seeds, config.positive_fraction)
    prior = manifest.provenance.metrics["train_prior_abnormal"]
    assert prior == round(np.mean([case.abnormal for case in train]), 6)  # before sampling
    card = (tiny / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "not for clinical use" in card and bundle.sha256 in card
    assert Image.open(tiny / "roc.png").size == (360, 360)
    assert [p.name for p in tiny.parent.iterdir()] == ["cxr-ruleout"]  # no staging left over


def test_onnx_gives_one_probability_per_film(tiny: Path) -> None:
    bundle = Bundle(tiny)
    config = load_config(TINY)
    cases = plan_cases(range(90_000, 90_006), 0.5)  # seeds in no split
    scores = probabilities(bundle, cases, config.phantom_size)
    assert scores.shape == (6,) and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))
    single = probabilities(bundle, cases[:1], config.phantom_size)  # dynamic batch
    assert single.shape == (1,) and abs(float(single[0]) - float(scores[0])) < 1e-5


def test_operating_points_reproduce_on_validation(tiny: Path) -> None:
    """The recorded sensitivity/specificity are what the shipped model does on validation."""
    manifest = Bundle(tiny).manifest
    points = manifest.operating_points
    assert set(points) == {"rule_out", "urgent"}
    assert 0 <= points["rule_out"].threshold <= points["urgent"].threshold <= 1
    assert points["rule_out"].sensitivity >= 0.98 and points["urgent"].specificity >= 0.95
    config = load_config(TINY)
    cases = plan_cases(config.splits.validation.seeds, config.positive_fraction)
    scores = probabilities(Bundle(tiny), cases, config.phantom_size)
    labels = np.array([case.abnormal for case in cases], dtype=np.float32)
    for point in points.values():
        measured = rates(scores, labels, point.threshold)
        assert measured.sensitivity == pytest.approx(point.sensitivity, abs=1e-6)
        assert measured.specificity == pytest.approx(point.specificity, abs=1e-6)


def test_tampered_model_is_refused(tiny: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny, tmp_path / "cxr-ruleout")
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"model\.sha256 does not match"):
        Bundle(copy)


def test_train_then_build_from_checkpoint_is_byte_identical(tiny: Path, tmp_path: Path) -> None:
    """Training again gives the same weights (deterministic), and `build --checkpoint` makes
    from them exactly the bundle a plain `build` made."""
    checkpoint = tmp_path / "ruleout.pt"
    assert main(["train", "ruleout", "--config", str(TINY), "--out", str(checkpoint)]) == 0
    again = tmp_path / "cxr-ruleout"
    command = ["build", "ruleout", "--config", str(TINY), "--out", str(again)]
    assert main([*command, "--checkpoint", str(checkpoint)]) == 0
    for name in ("model.onnx", "manifest.yaml", "roc.png"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name


def test_checkpoint_of_another_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "ruleout.pt"
    assert main(["train", "ruleout", "--config", str(TINY), "--out", str(checkpoint)]) == 0
    edited = tmp_path / "edited.yaml"
    edited.write_text(TINY.read_text() + "\n# edited\n")
    command = ["build", "ruleout", "--config", str(edited), "--out", str(tmp_path / "b")]
    assert main([*command, "--checkpoint", str(checkpoint)]) == 2
    assert "trained with another config" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_phantoms_command_writes_films_and_labels(tmp_path: Path) -> None:
    out = tmp_path / "cxr"
    argv = ["phantoms", "--kind", "cxr", "--count", "6", "--out", str(out), "--seed", "40"]
    assert main([*argv, "--positive-fraction", "0.5", "--size", "128"]) == 0
    with (out / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == [f"cxr-{i:05d}.dcm" for i in range(6)]
    assert sum(row["abnormal"] == "1" for row in rows) == 3
    patient_ids = set()
    for index, row in enumerate(rows):
        ds = pydicom.dcmread(out / row["file"])
        patient_ids.add(ds.PatientID)
        flags = {key: row[key] == "1" for key in ("opacity", "pneumothorax")}
        assert (row["abnormal"] == "1") == (flags["opacity"] or flags["pneumothorax"])
        expected = make_chest_phantom(40 + index, size=128, **flags).pixels
        assert ds.Modality == "DX" and np.array_equal(ds.pixel_array, expected)  # labels fit
    assert len(patient_ids) == 6


def test_calibrate_hand_made_case() -> None:
    """50 abnormal at 0.02, 0.04 .. 1.00; 20 normal at 0.01 .. 0.20.

    rule_out: 49 of 50 (0.98) must stay at or above it; of those thresholds the second-lowest
    abnormal score, 0.04, has the best specificity (normals below it: 0.01-0.03, 3 of 20).
    urgent: 19 of 20 normals (0.95) must fall below it; the lowest threshold is 0.20, where
    abnormals 0.20 .. 1.00 (41 of 50) are flagged.
    """
    abnormal, normal = np.arange(2, 102, 2) / 100, np.arange(1, 21) / 100
    scores = np.concatenate([abnormal, normal])
    labels = np.concatenate([np.ones(50), np.zeros(20)])
    points = calibrate(scores, labels, target_sensitivity=0.98, target_specificity=0.95)
    assert astuple(points["rule_out"]) == pytest.approx((0.04, 0.98, 0.15))
    assert astuple(points["urgent"]) == pytest.approx((0.20, 0.82, 0.95))
    assert rates(scores, labels, 0.05).sensitivity < 0.98  # the next threshold up fails


def test_calibrate_keeps_urgent_at_or_above_rule_out() -> None:
    """Perfect separation: rule_out keeps every abnormal film (no sensitivity is given away
    for nothing), and urgent, whose specificity target is met lower, moves up to it."""
    normal, abnormal = np.linspace(0.1, 0.4, 50), np.linspace(0.6, 0.9, 50)
    scores, labels = np.concatenate([normal, abnormal]), np.repeat([0.0, 1.0], 50)
    points = calibrate(scores, labels, target_sensitivity=0.98, target_specificity=0.95)
    assert points["rule_out"].threshold == pytest.approx(abnormal[0])
    assert points["rule_out"].sensitivity == 1.0 and points["rule_out"].specificity == 1.0
    assert points["urgent"] == points["rule_out"]


def test_auc_counts_ties_as_half() -> None:
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5


def test_batch_control_fixes_positives_per_batch() -> None:
    """Seed 000 batch control at P50 on a 30:70 set: 5 of 10 positive, minority cycled."""
    labels = np.array([1.0] * 30 + [0.0] * 70)
    batches = controlled_batches(labels, 10, 0.5, np.random.default_rng(0))
    assert len(batches) == 10
    assert all(labels[batch].sum() == 5 for batch in batches)
    drawn = np.concatenate(batches)
    counts = np.bincount(drawn[labels[drawn] == 1], minlength=30)
    assert counts.min() >= 1 and counts.max() <= 2  # 50 positive slots: every one, some twice
    assert len(set(drawn[labels[drawn] == 0].tolist())) == 50  # negatives never repeat


def test_sampling_options_seed_003_a2() -> None:
    """Undersampling on a 30:70 set keeps 30 of each per epoch (nothing repeated, every
    positive once); random batches are a plain shuffle; prior thresholding undoes a prior."""
    labels = np.array([1.0] * 30 + [0.0] * 70)
    rng = np.random.default_rng(0)
    spec = TrainSpec(epochs=1, batch_size=10, learning_rate=0.1, sampling="undersample")
    batches = epoch_batches(labels, spec, rng)
    drawn = np.concatenate(batches)
    assert len(batches) == steps_per_epoch(labels, spec) == 6
    assert all(labels[batch].sum() == 5 for batch in batches)
    assert len(set(drawn.tolist())) == 60 and set(np.flatnonzero(labels).tolist()) <= set(drawn)
    plain = TrainSpec(epochs=1, batch_size=10, learning_rate=0.1, sampling="random")
    assert sorted(np.concatenate(epoch_batches(labels, plain, rng)).tolist()) == list(range(100))
    assert prior_thresholded(np.array([0.5]), 0.8)[0] == pytest.approx(0.2)
    assert prior_thresholded(np.array([0.3]), 0.5)[0] == pytest.approx(0.3)


def test_separated_validation_gets_exact_intervals_not_collapsed_ones() -> None:
    """Every validation film called right at both points: the operating points' intervals are
    Clopper-Pearson (0.025 ** (1 / 150) = 0.9757 from 150 of 150), not the bootstrap's
    [1, 1]; a test AUC of 1.0 is marked saturated with the counts' lower bound."""
    labels = np.array([1.0] * 150 + [0.0] * 150, dtype=np.float32)
    scores = np.where(labels > 0.5, 0.9, 0.1).astype(np.float32)
    cases = [Case(i, opacity=bool(label), pneumothorax=False) for i, label in enumerate(labels)]
    spec = load_config(TINY).calibration
    evaluation = evaluate((scores, labels), scores, cases, spec)
    for sensitivity, specificity in evaluation.validation_ci.values():
        for low, high in (sensitivity, specificity):
            assert low == pytest.approx(0.025 ** (1 / 150)) and high == 1.0
    assert evaluation.test_auc == 1.0 and evaluation.test_auc_saturated
    assert evaluation.test_ci["test_auc"] == pytest.approx((0.025 ** (2 / 150), 1.0))


def test_prior_thresholding_divides_by_the_data_share_before_sampling() -> None:
    """Seed 003 A.2: p(i) = |i| / sum |k| over the training data, whatever share sampling gave
    the batches."""
    labels = np.array([1.0] * 30 + [0.0] * 70)
    assert class_prior(labels) == pytest.approx(0.3)
    assert prior_thresholded(np.array([0.3]), class_prior(labels))[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="prior"):
        prior_thresholded(np.array([0.5]), 1.0)


def test_batch_control_experiment_thresholds_by_the_data_prior() -> None:
    """Every mode of seed 000's experiment prior-thresholds by the training films' share
    (before: by the mode's batch share, e.g. 5/6 for P83)."""
    setup = batch_control.Setup(
        trials=1, train_films=12, test_films=4, phantom_size=48, input_size=16, channels=(2,)
    )
    rows = batch_control.run(setup)
    train_share = class_prior(
        np.array([c.abnormal for c in plan_cases(range(10_000, 10_012), 0.22)])
    )
    assert [row.mode for row in rows] == list(batch_control.MODES)
    assert {row.prior for row in rows} == {train_share}


def test_overlapping_splits_are_rejected(tmp_path: Path) -> None:
    text = TINY.read_text(encoding="utf-8").replace("first_seed: 2000", "first_seed: 1100")
    config = tmp_path / "overlap.yaml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="overlap"):
        load_config(config)


def test_export_check_fails_loudly_on_a_different_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    exported, other = RuleoutNet([4]), RuleoutNet([4])
    export_onnx(exported, tmp_path / "model.onnx", 32)
    written = (tmp_path / "model.onnx").read_bytes()  # no stack traces: same bytes anywhere
    assert b"stack_trace" not in written
    assert str(Path(__file__).resolve().parent.parent).encode() not in written
    images = np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32)
    assert check_against_torch(exported, tmp_path / "model.onnx", images, 1) <= 1e-4
    with pytest.raises(ExportMismatch, match="differs from PyTorch"):
        check_against_torch(other, tmp_path / "model.onnx", images, 1)


def _git(repository: Path, *arguments: str) -> str:
    settings = ("user.name=Test", "user.email=t@example.invalid", "commit.gpgsign=false")
    options = [part for setting in settings for part in ("-c", setting)]
    done = subprocess.run(
        ["git", *options, *arguments], cwd=repository, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_code_revision_is_the_sources_commit_and_marks_a_dirty_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card's revision is HEAD only when the sources are committed: an edit or an
    untracked file under training/ (the shipped cards named a commit without segmenter.py)
    marks it -dirty; files outside the sources do not; outside git it is "unknown"."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above
    assert code_revision(tmp_path) == "unknown"
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "ruleout.py").write_text("a = 1\n", encoding="utf-8")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "sources")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert code_revision(tmp_path) == head
    (tmp_path / "notes.txt").write_text("not a source\n", encoding="utf-8")
    assert code_revision(tmp_path) == head
    (tmp_path / "training" / "segmenter.py").write_text("b = 2\n", encoding="utf-8")
    assert code_revision(tmp_path) == f"{head}-dirty"
    _git(tmp_path, "add", "training/segmenter.py")
    _git(tmp_path, "commit", "-q", "-m", "segmenter")
    (tmp_path / "training" / "ruleout.py").write_text("a = 3\n", encoding="utf-8")
    assert code_revision(tmp_path) == _git(tmp_path, "rev-parse", "HEAD") + "-dirty"
    assert "uncommitted changes" in revision_caveat(code_revision(tmp_path))
