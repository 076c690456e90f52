"""cxr-findings (seed 004): the feature pyramid sum, diseased-area augmentation, CXR-LT metrics,
seed 002's rule on the findings, and tiny builds end to end to a verified bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cadnode.core.config import EngineSettings, LimitsSettings
from cadnode.infer import catalogue
from cadnode.infer.bundle import Bundle
from training.cli import EVALUATED, main
from training.evaluate import EVALUATORS
from training.findings import (
    FeaturePyramidSum,
    FindingsFilm,
    FpsmSpec,
    Patch,
    ReportSpec,
    asymmetric_loss,
    dadam_records,
    phantom_boxes,
    phantom_of,
    plan_records,
    read_annotations,
    synthetic,
    write_findings_set,
)
from training.findings_build import (
    BEST_F1,
    FINDINGS_OUTPUT,
    NOT_REPORTED,
    SPECIFICITY,
    best_f1_threshold,
    report_point,
    reported_findings,
)
from training.metrics import average_precision, frequency_group, group_means
from training.records import NO_FINDING, index_folder

REPOSITORY = Path(__file__).resolve().parent.parent
TINY = REPOSITORY / "training/configs/findings-tiny.yaml"
FREQUENCIES = {"Consolidation": 0.25, "Pleural Effusion": 0.12, "Cardiomegaly": 0.06,
               "Pneumothorax": 0.03, "Nodule": 0.008}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_pyramid_levels_are_pooled_to_the_deepest_and_summed() -> None:
    torch.manual_seed(0)
    model = FeaturePyramidSum(FpsmSpec(widths=[4, 8, 8, 16], fpn_width=8, levels=[4, 3, 2]), 6)
    model.eval()
    image = torch.rand(2, 1, 64, 64)
    levels = model.pyramid(image)
    assert {k: tuple(v.shape[2:]) for k, v in levels.items()} == {4: (4, 4), 3: (8, 8), 2: (16, 16)}
    expected = (
        levels[4]
        + torch.nn.functional.avg_pool2d(levels[3], 2)
        + (torch.nn.functional.avg_pool2d(levels[2], 4))
    )
    assert torch.allclose(model.summed(image), expected, atol=1e-6)
    abnormal, findings = model(image)
    assert findings.shape == (2, 7) and torch.allclose(abnormal, 1 - findings[:, 1])
    assert torch.allclose(findings[:, 0], abnormal)
    alone = FeaturePyramidSum(FpsmSpec(widths=[4, 8, 8, 16], fpn_width=8, levels=[4]), 6)
    assert set(alone.pyramid(image)) == {4}  # the backbone-only baseline has no pyramid


def test_asymmetric_loss_ignores_easy_negatives_below_the_clip() -> None:
    targets = torch.tensor([[0.0, 1.0]])
    easy = asymmetric_loss(torch.tensor([[-4.0, 4.0]]), targets)  # p(neg) 0.018 < clip 0.05
    hard = asymmetric_loss(torch.tensor([[2.0, 4.0]]), targets)
    positive_only = -torch.log(torch.sigmoid(torch.tensor(4.0)))
    assert torch.isclose(easy, positive_only) and hard > easy


def test_phantom_findings_have_their_boxes_and_long_tailed_counts() -> None:
    records = plan_records(range(100, 400), FREQUENCIES)
    counts = {k: sum(r.labels[k] > 0.5 for r in records) for k in FREQUENCIES}
    assert counts == {"Consolidation": 75, "Pleural Effusion": 36, "Cardiomegaly": 18,
                      "Pneumothorax": 9, "Nodule": 2}  # fmt: skip
    for record in records:
        assert record.labels[NO_FINDING] == float(not any(record.labels[k] for k in FREQUENCIES))
    sick = next(r for r in records if sum(r.labels[k] for k in FREQUENCIES) >= 2)
    shown = {k for k in FREQUENCIES if sick.labels[k] > 0.5}
    assert set(phantom_boxes(phantom_of(sick, 96))) == shown


def test_diseased_area_is_pasted_and_its_label_added() -> None:
    records = plan_records(range(500, 560), FREQUENCIES)
    film = FindingsFilm((NO_FINDING, *FREQUENCIES), 64, 96)
    host = next(r for r in records if r.labels[NO_FINDING] > 0.5)
    donor = next(r for r in records if r.labels["Pneumothorax"] > 0.5)
    made = synthetic(host, (Patch(donor, "Pneumothorax", None, 1.0),), 0)
    image, target = film(made, np.random.default_rng(0))
    assert target.tolist() == [0.0, *(float(k == "Pneumothorax") for k in FREQUENCIES)]
    area, top, left = film.area(made.patches[0])
    _, rows, columns = area.shape
    assert np.array_equal(image[:, top : top + rows, left : left + columns], area)
    plain = film.image(host)
    outside = np.ones(plain.shape, bool)
    outside[:, top : top + rows, left : left + columns] = False
    assert np.array_equal(image[outside], plain[outside])  # the rest of the host untouched
    mixed = synthetic(host, (Patch(donor, "Pneumothorax", None, 0.6),), 1)
    blended = film.image(mixed)[:, top : top + rows, left : left + columns]
    host_area = plain[:, top : top + rows, left : left + columns]
    assert np.allclose(blended, 0.6 * area + 0.4 * host_area, atol=1e-6)


def test_dadam_brings_minority_classes_up_with_cutmix_and_mixup() -> None:
    train = plan_records(range(600, 800), FREQUENCIES)
    groups = {"Consolidation": "head", "Pleural Effusion": "head", "Cardiomegaly": "medium",
              "Pneumothorax": "medium", "Nodule": "tail"}  # fmt: skip
    from training.findings import DadamSpec

    made = dadam_records(train, list(FREQUENCIES), groups, DadamSpec(), {}, seed=1)
    for label in ("Cardiomegaly", "Pneumothorax", "Nodule"):
        total = sum(r.labels[label] > 0.5 for r in (*train, *made))
        assert total >= 20  # 0.1 of 200
    assert not any(
        p.label in ("Consolidation",) and len(m.patches) == 1 for m in made for p in m.patches
    )
    cutmix = [m for m in made if len(m.patches) == 1]
    mixup = [m for m in made if len(m.patches) == 2]
    assert cutmix and mixup
    assert all(m.host is not None and m.host.labels[NO_FINDING] > 0.5 for m in cutmix)
    assert all(p.alpha == 1.0 for m in cutmix for p in m.patches)
    assert all(p.alpha == 0.6 and m.labels[p.label] == 1.0 for m in mixup for p in m.patches)
    # Cardiomegaly is drawn beside effusions: Mixup pairs it with them.
    partners = {m.patches[1].label for m in mixup if m.patches[0].label == "Cardiomegaly"}
    assert partners == {"Pleural Effusion"}


def test_cxrlt_metrics_against_hand_computed_values() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert average_precision(scores, np.array([1, 0, 1, 0, 0])) == pytest.approx(0.5 + 2 / 3 / 2)
    tied = np.array([0.9, 0.8, 0.8, 0.6])  # the tie enters together: precision 2/3 there
    assert average_precision(tied, np.array([1, 1, 0, 1])) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert np.isnan(average_precision(scores, np.zeros(5)))
    assert [frequency_group(s) for s in (0.2, 0.1, 0.05, 0.01, 0.005)] == [
        "head", "medium", "medium", "medium", "tail"]  # fmt: skip
    means = group_means({"a": 1.0, "b": 0.5, "c": 0.2}, {"a": "head", "b": "head", "c": "tail"})
    assert means == {"head": 0.75, "tail": 0.2}


def test_a_label_with_two_validation_positives_gets_a_specificity_point_not_best_f1() -> None:
    """The best F1 on two positives is the threshold that catches the high one alone: F1 2/3
    on validation, noise on test (the shipped Nodule had test precision 0). Below
    min_positives_for_f1 the point is the lowest with validation specificity >= target."""
    spec = ReportSpec(min_positives_for_f1=10, fallback_specificity=0.99)
    negatives = np.linspace(0.0, 0.8, 298)
    scores, truth = np.append(negatives, [0.25, 0.9]), np.append(np.zeros(298), [1.0, 1.0])
    choice = report_point(scores, truth, spec)
    assert (choice.rule, choice.positives, choice.negatives) == (SPECIFICITY, 2, 298)
    assert choice.threshold != best_f1_threshold(scores, truth) == 0.9
    # 296 of 298 negatives below it (0.9933); one step lower 295 (0.9899 < 0.99)
    assert choice.threshold == negatives[296]
    assert np.mean(negatives < choice.threshold) >= 0.99 > np.mean(negatives < negatives[295])


def test_best_f1_needs_enough_positives_and_a_specificity_point_enough_negatives() -> None:
    spec = ReportSpec(min_positives_for_f1=10, fallback_specificity=0.99)
    rng = np.random.default_rng(0)
    truth = np.append(np.zeros(200), np.ones(10))
    scores = np.append(rng.uniform(0, 0.6, 200), rng.uniform(0.4, 1.0, 10))
    enough = report_point(scores, truth, spec)
    assert enough.rule == BEST_F1 and enough.threshold == best_f1_threshold(scores, truth)
    few = report_point(scores[:99], truth[:99], spec)  # 99 negatives: 0.99 is not measurable
    assert (few.rule, few.threshold, few.negatives) == (NOT_REPORTED, None, 99)


def test_two_class_rule_decides_the_reported_findings() -> None:
    thresholds = {"Pneumothorax": 0.5, "Nodule": 0.4}
    p = {"Pneumothorax": 0.7, "Nodule": 0.3, NO_FINDING: 0.1}
    assert reported_findings(p, thresholds, alpha=0.997, beta=0.3).boxes == ["Pneumothorax"]
    unsure = reported_findings({**p, NO_FINDING: 0.5}, thresholds, alpha=0.997, beta=0.3)
    assert unsure.boxes == ["Pneumothorax"] and unsure.healthy
    healthy = reported_findings({**p, NO_FINDING: 0.999}, thresholds, alpha=0.997, beta=0.3)
    assert healthy.boxes == [] and healthy.healthy


@pytest.fixture(scope="module")
def tiny_findings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    engines = tmp_path_factory.mktemp("findings") / "engines"
    argv = ["build", "findings", "--config", str(TINY), "--out", str(engines / "cxr-findings")]
    assert main([*argv, "--workers", "0"]) == 0
    return engines


def test_tiny_findings_bundle_verifies_with_codes_and_both_outputs(tiny_findings: Path) -> None:
    said: list[str] = []
    settings = EngineSettings(dir=tiny_findings, backend="onnxruntime")
    assert catalogue.verify(settings, limits=LimitsSettings(), say=said.append) == 0, said
    bundle = Bundle(tiny_findings / "cxr-findings")
    manifest = bundle.manifest
    codes = {label.name: label.code.value for label in manifest.labels}
    assert codes == {"abnormal": "263654008", NO_FINDING: "17621005", "Consolidation": "95436008",
                     "Pleural Effusion": "60046008", "Cardiomegaly": "8186001",
                     "Pneumothorax": "36118008", "Nodule": "427359005"}  # fmt: skip
    assert set(manifest.operating_points) == {"rule_out", "urgent"}
    findings = manifest.findings
    assert findings is not None and findings.output == FINDINGS_OUTPUT
    assert findings.healthy == NO_FINDING and findings.prefilter is not None
    assert (findings.prefilter.alpha, findings.prefilter.beta) == (0.997, 0.3)
    reported = {k for k, points in findings.operating_points.items() if "report" in points}
    assert reported == {"Consolidation", "Pleural Effusion"}
    assert set(findings.not_reported) == set(codes) - {"abnormal", NO_FINDING} - reported
    metrics = manifest.provenance.metrics
    assert {"test_map", "test_ap_nodule", "test_auc_cardiomegaly"} <= set(metrics)
    from training.export import session

    runner = session(bundle.model_path, 1)
    assert [o.name for o in runner.get_outputs()] == ["probability", FINDINGS_OUTPUT]
    card = (bundle.folder / "MODEL_CARD.md").read_text()
    assert "Feature Pyramid Sum" in card and "mAP" in card and "(DADAM)" in card
    assert "| Consolidation | best F1 |" in card and "| Nodule | not reported |" in card
    assert all((bundle.folder / name).is_file() for name in ("pr.png", "roc-findings.png"))


def test_findings_train_from_a_cxrlt_folder_with_vindr_boxes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert (
        write_findings_set(data, count=40, first_seed=9000, size=64, frequencies=FREQUENCIES) == 40
    )
    records = index_folder(data, "cxrlt")
    boxes = read_annotations(data / "annotations.csv")
    sick = [r for r in records if r.labels["Pneumothorax"] > 0.5]
    assert sick and all(any(k == "Pneumothorax" for k, _ in boxes[r.key]) for r in sick)
    out = tmp_path / "engines" / "cxr-findings"
    argv = ["build", "findings", "--config", str(TINY), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--workers", "0", "--validation", "0.25", "--test", "0.25"]) == 0
    card = (out / "MODEL_CARD.md").read_text()
    assert "--layout cxrlt" in card and "The cxrlt dataset layout" in card
    said: list[str] = []  # loaded and run as the node runs it, both outputs checked
    settings = EngineSettings(dir=out.parent, backend="onnxruntime")
    assert catalogue.verify(settings, limits=LimitsSettings(), say=said.append) == 0, said


def test_evaluate_offers_exactly_the_engines_it_can_measure() -> None:
    """`cadnode-train evaluate findings` would have no evaluator: the command line refuses it
    with its usage rather than crash."""
    assert set(EVALUATED) == set(EVALUATORS)
