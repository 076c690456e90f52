"""The seeds' metrics against hand-computed cases, and `cadnode-train froc` (Duke BCS-DBT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.cli import main
from training.datasets import DukeBox, read_duke_boxes, rle_decode, rle_encode
from training.froc import Prediction, froc, is_true_positive, read_predictions
from training.metrics import (
    Confusion,
    auc,
    bootstrap_interval,
    coefficient_of_variation,
    dice,
    dice_per_image,
    pooled_dice,
    proportion_interval,
    saturated_auc_interval,
)
from training.prefilter import Filtered, healthy_prefilter


def test_confusion_rates_seed_000() -> None:
    """Called [1,1,0,0,1,0] against truth [1,0,0,1,1,0]: TP 2, FP 1, TN 2, FN 1."""
    counts = Confusion.of(np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 1, 1, 0]))
    assert (counts.tp, counts.fp, counts.tn, counts.fn) == (2, 1, 2, 1)
    assert counts.rates() == pytest.approx(
        {"tpr": 2 / 3, "tnr": 2 / 3, "fpr": 1 / 3, "accuracy": 4 / 6, "f1": 4 / 6}
    )
    assert Confusion.of(np.zeros(3), np.zeros(3)).f1 == 0.0  # nothing to find, nothing called


def test_f1_cv_is_sample_sd_over_mean() -> None:
    """F1 of 0.6, 0.8, 0.7 over three trials: mean 0.7, sample SD 0.1, CV 1/7."""
    assert coefficient_of_variation([0.6, 0.8, 0.7]) == pytest.approx(0.1 / 0.7)
    with pytest.raises(ValueError, match="two trials"):
        coefficient_of_variation([0.5])


def test_dice_per_image_and_pooled_seed_001() -> None:
    """Image 1: 4 predicted px, 2 true, both inside -> 4/6. Image 2: both empty -> 1.
    Image 3: 2 predicted, none true -> 0. Per image: (2/3 + 1 + 0) / 3; pooled: 2*2 / (6+2)."""
    one_p, one_t = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    one_p[0, :4] = True
    one_t[0, :2] = True
    empty = np.zeros((4, 4), bool)
    three_p = np.zeros((4, 4), bool)
    three_p[3, :2] = True
    predicted, truth = [one_p, empty, three_p], [one_t, empty, empty]
    assert dice(one_p, one_t) == pytest.approx(2 / 3)
    assert dice(empty, empty) == 1.0 and dice(three_p, empty) == 0.0
    assert dice_per_image(predicted, truth) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert pooled_dice(predicted, truth) == pytest.approx(0.5)


def test_auc_and_bootstrap() -> None:
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    values = np.linspace(0, 1, 101)
    low, high = bootstrap_interval(lambda i: float(values[i].mean()), len(values), seed=1)
    assert 0.4 < low < 0.5 < high < 0.6  # the mean 0.5 lies inside a narrow interval


def test_exact_intervals_where_a_bootstrap_collapses() -> None:
    """300 of 300 right: the bootstrap sees only 1.0, Clopper-Pearson gives 0.9878 (the exact
    0.025 ** (1 / 300)); a middling proportion matches scipy's textbook case; a perfectly
    separated AUC on 150 + 150 films has the counts' lower bound 0.025 ** (2 / 150)."""
    right = np.ones(300)
    assert bootstrap_interval(lambda i: float(right[i].mean()), 300) == (1.0, 1.0)
    low, high = proportion_interval(300, 300)
    assert low == pytest.approx(0.025 ** (1 / 300)) and high == 1.0
    assert low == pytest.approx(0.98778, abs=1e-5)
    assert proportion_interval(7, 10) == pytest.approx((0.34755, 0.93326), abs=1e-5)
    assert proportion_interval(0, 30)[0] == 0.0
    assert saturated_auc_interval(150, 150) == pytest.approx((0.025 ** (2 / 150), 1.0))
    assert saturated_auc_interval(150, 150)[0] == pytest.approx(0.9520, abs=1e-4)


def test_siim_rle_hand_case() -> None:
    """Column-major order: pixels 3, 4 (column 1, rows 0-1) and 8 (column 2, row 2); the
    second run starts 3 after the end of the first: "3 2 3 1"."""
    mask = np.zeros((3, 3), bool)
    mask[0, 1] = mask[1, 1] = mask[2, 2] = True
    assert rle_encode(mask) == "3 2 3 1"
    assert np.array_equal(rle_decode("3 2 3 1", 3, 3), mask)
    assert rle_encode(np.zeros((3, 3), bool)) == "-1"
    assert not rle_decode(" -1", 3, 3).any()
    tall = np.zeros((5, 2), bool)
    tall[4, 1] = True  # a run that reaches the last pixel is still written
    assert rle_decode(rle_encode(tall), 5, 2)[4, 1]


# --- FROC with the Duke rule ---------------------------------------------------------------------

TRUTH_CSV = """PatientID,StudyUID,View,Slice,X,Y,Width,Height,Class,VolumeSlices
P1,S1,lcc,10,100,100,40,30,cancer,20
P1,S1,lcc,5,400,400,300,400,benign,20
P2,S2,lmlo,12,200,200,50,50,benign,20
"""


def box(centre: tuple[float, float], first: int, depth: int) -> str:
    return f"{centre[0] - 10},{centre[1] - 10},{first},20,20,{depth}"


# Lesion a1 centre (120, 115), radius max(25, 100) = 100; a2 centre (550, 600), radius 250;
# c1 centre (225, 225), radius 100; slice tolerance 20 / 4 = 5.
PREDICTIONS_CSV = "PatientID,StudyUID,View,X,Y,Z,Width,Height,Depth,Score\n" + "\n".join(
    [
        f"P1,S1,LCC,{box((150, 130), 8, 4)},0.9",  # a1: 33.5 px, slice 10: TP
        f"P1,S1,lcc,{box((125, 120), 15, 2)},0.8",  # a1's place, slice 16 (6 > 5): FP
        f"P1,S1,lcc,{box((800, 600), 4, 2)},0.6",  # a2: exactly 250 px, slice 5: TP
        f"P1,S1,rcc,{box((300, 300), 0, 1)},0.75",  # a volume without lesions: FP
        f"P2,S2,lmlo,{box((326, 225), 11, 2)},0.5",  # c1: 101 px > 100: FP
        f"P2,S2,lmlo,{box((230, 230), 11, 2)},0.4",  # c1: TP
        f"P1,S1,lcc,{box((121, 116), 9, 2)},0.85",  # a1 again: neither TP nor FP
    ]
)


@pytest.fixture
def froc_files(tmp_path: Path) -> tuple[Path, Path]:
    truth, predictions = tmp_path / "truth.csv", tmp_path / "predictions.csv"
    truth.write_text(TRUTH_CSV, encoding="utf-8")
    predictions.write_text(PREDICTIONS_CSV + "\n", encoding="utf-8")
    return truth, predictions


def test_duke_true_positive_rule_bounds() -> None:
    lesion = DukeBox("P", "S", "lcc", 10, 100, 100, 40, 30, "cancer", 20)

    def at(x: float, y: float, z: int, depth: int = 2) -> Prediction:
        return Prediction("P", "S", "lcc", x - 10, y - 10, z, 20, 20, depth, 1.0)

    assert is_true_positive(at(220, 115, 9), lesion, 5.0)  # 100 px exactly: inclusive
    assert not is_true_positive(at(220.5, 115, 9), lesion, 5.0)
    assert is_true_positive(at(120, 115, 14), lesion, 5.0)  # centre slice 15: 5 exactly
    assert not is_true_positive(at(120, 115, 15), lesion, 5.0)
    big = DukeBox("P", "S", "lcc", 10, 0, 0, 300, 400, "benign", 20)  # half diagonal 250
    assert is_true_positive(at(150 + 250, 200, 9), big, 5.0)
    assert not is_true_positive(at(150 + 251, 200, 9), big, 5.0)


def test_froc_hand_computed(froc_files: tuple[Path, Path]) -> None:
    """Thresholds 0.9 / 0.85 / 0.6 / 0.4 (the TPs' scores): FPs per volume (3 volumes)
    0, 0, 2/3, 1 with lesions found 1, 1, 2, 3 of 3 and breasts 1, 1, 1, 2 of 2. Interpolated:
    at 0.25 FP 1/3 + 0.25 / (2/3) * 1/3 = 11/24; at 0.5, 7/12; from 1 FP on, everything."""
    result = froc(read_duke_boxes(froc_files[0]), read_predictions(froc_files[1]))
    assert (result.volumes, result.lesions, result.breasts) == (3, 3, 2)
    assert result.lesion == pytest.approx({0.25: 11 / 24, 0.5: 7 / 12, 1.0: 1, 2.0: 1, 4.0: 1})
    assert result.breast == pytest.approx({0.25: 0.5, 0.5: 0.5, 1.0: 1, 2.0: 1, 4.0: 1})


def test_froc_slice_tolerance_without_volume_slices(tmp_path: Path) -> None:
    """No VolumeSlices: the tolerance is max(Z + Depth) of the volume's predictions / 4."""
    truth = tmp_path / "truth.csv"
    truth.write_text(
        "PatientID,StudyUID,View,Slice,X,Y,Width,Height,Class\nP,S,rcc,10,0,0,20,20,cancer\n",
        encoding="utf-8",
    )
    far = Prediction("P", "S", "rcc", 0, 0, 14, 20, 20, 2, 0.9)  # centre 15, 5 slices away
    deep = Prediction("P", "S", "rcc", 500, 500, 0, 20, 20, 20, 0.1)  # Z + Depth = 20
    boxes = read_duke_boxes(truth)
    assert froc(boxes, [far, deep]).lesion[1.0] == 1.0  # tolerance 20 / 4 = 5: found
    shallow = Prediction("P", "S", "rcc", 500, 500, 0, 20, 20, 16, 0.1)  # tolerance 4
    assert froc(boxes, [far, shallow]).lesion[4.0] == 0.0


def test_froc_command_prints_json(
    froc_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth, predictions = froc_files
    assert main(["froc", "--truth", str(truth), "--predictions", str(predictions)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lesion_based"]["sensitivity_at_0.25_fp_per_volume"] == pytest.approx(11 / 24)
    assert printed["breast_based"]["sensitivity_at_2_fp_per_volume"] == 1.0
    labels = tmp_path / "labels.csv"  # six volumes: FPs per volume halve, 0.25 FP now lies at 7/12
    labels.write_text(
        "PatientID,StudyUID,View,Normal,Actionable,Benign,Cancer\n"
        + "".join(f"P{i},S{i},lcc,1,0,0,0\n" for i in range(6)),
        encoding="utf-8",
    )
    argv = ["froc", "--truth", str(truth), "--predictions", str(predictions)]
    assert main([*argv, "--labels", str(labels)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["volumes"] == 6
    assert printed["lesion_based"]["sensitivity_at_0.25_fp_per_volume"] == pytest.approx(7 / 12)
    assert (
        main(["froc", "--truth", str(tmp_path / "missing.csv"), "--predictions", str(predictions)])
        == 2
    )


def test_healthy_prefilter_seed_002() -> None:
    """alpha 0.997 replaces the boxes, beta 0.3 adds the finding, below beta nothing changes."""
    boxes = [(10, 10, 5, 5), (40, 40, 8, 8)]
    assert healthy_prefilter(boxes, 0.998) == Filtered([], healthy=True)
    kept = healthy_prefilter(boxes, 0.5)
    assert kept.boxes == boxes and kept.healthy
    assert healthy_prefilter(boxes, 0.3).healthy is False  # strictly above beta
    assert healthy_prefilter(boxes, 0.997).boxes == boxes  # strictly above alpha
    with pytest.raises(ValueError, match="beta <= alpha"):
        healthy_prefilter(boxes, 0.5, alpha=0.2, beta=0.3)


def test_batch_control_report_checks_seed_000_claims() -> None:
    """The experiment's verdicts on made-up trials: falling TPR, RAND least stable."""
    from training.experiments.batch_control import MODES, Row, findings, table

    def trials(tpr: float, f1s: list[float]) -> list[dict[str, float]]:
        return [{"tpr": tpr, "tnr": 0.9, "fpr": 0.1, "accuracy": 0.8, "f1": f} for f in f1s]

    steady = [0.80, 0.81, 0.79]
    rows = [
        Row(mode, trials(1.0 - 0.1 * i, steady), [0.8] * 3, 0.22) for i, mode in enumerate(MODES)
    ]
    rows[-1] = Row("RAND", trials(0.3, [0.4, 0.8, 0.6]), [0.8] * 3, 0.22)
    assert all(findings(rows).values())
    assert "| RAND | 0.30 ± 0.00 |" in table(rows)
    rows[2] = Row("P66", trials(0.99, steady), [0.8] * 3, 0.22)  # P66 above P83: not monotone
    assert not findings(rows)["TPR never rises from one mode to the next (P100..P17)"]
