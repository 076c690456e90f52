"""Train, evaluate and bundle cxr-findings (training.findings): `cadnode-train build findings`.

Evaluation is CXR-LT's: average precision per class and its mean (mAP), the means over the
head, medium and tail classes (grouped by their share of the training images), AUC per
class; 95 % percentile bootstrap intervals, and a distribution-free bound where an AUC is
saturated. Operating points: each finding's threshold (report_point: the best F1 on
validation where the label has enough validation positives, else a high specificity), seed
002's two-class rule on P(No Finding) (alpha, beta: which findings are reported), and the
rule-out point on P(abnormal) = 1 - P(No Finding), calibrated as the rule-out engine's is.
Everything after export is computed on ONNX Runtime's outputs of the shipped file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cadnode.infer.bundle import (
    REPORT_POINT,
    Bundle,
    Findings,
    Label,
    Manifest,
    ModelFile,
    OperatingPoint,
    Prefilter,
    Preprocessing,
    TaskKind,
    sha256_of,
)
from training.bundle import (
    CALIBRATION_FILE,
    CHEST_FILMS,
    MODEL_FILE,
    PHANTOM_CAVEAT,
    ROC_FILE,
    calibrated_points,
    compose_card,
    interval,
    provenance,
    staged,
    write_bundle,
)
from training.checkpoint import fit
from training.export import INPUT, OUTPUT, TOLERANCE, ExportMismatch, export_onnx, session
from training.findings import (
    ABNORMAL_CODE,
    ANNOTATIONS_CSV,
    BoxXYWH,
    FeaturePyramidSum,
    FindingsConfig,
    FindingsFilm,
    ReportSpec,
    batch_loss,
    dadam_records,
    load_config,
    plan_records,
    read_annotations,
)
from training.metrics import (
    auc,
    average_precision,
    bootstrap_interval,
    frequency_group,
    group_means,
    proportion_interval,
    saturated_auc_interval,
)
from training.plots import COLOURS, Chart, draw_calibration, draw_roc
from training.prefilter import Filtered, healthy_prefilter
from training.records import ABNORMAL, NO_FINDING, Record
from training.ruleout import Evaluation, evaluate, roc_table
from training.sources import Source, folder_splits, resolved
from training.streaming import EpochBatches, Schedule, in_order, loader, seed_everything
from training.streaming import fit as fit_streaming

FINDINGS_OUTPUT = "findings"
PR_FILE, FINDINGS_ROC_FILE = "pr.png", "roc-findings.png"
BATCH = 64
PALETTE = (*COLOURS, "brown", "teal", "olive", "magenta")


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    splits: dict[str, list[Record]]
    description: str | None  # a dataset folder's; None for the config's phantoms
    boxes: dict[str, list[tuple[str, BoxXYWH]]] = field(default_factory=dict)


def findings_data(config: FindingsConfig, source: Source) -> Data:
    if source.data is None:
        splits = {
            name: plan_records(split.seeds, config.frequencies)
            for name, split in config.splits.named().items()
        }
        return Data(splits, None)
    splits, description = folder_splits(source, config.seed)
    missing = [k for k in config.labels if k not in splits["train"][0].labels]
    if missing:
        raise ValueError(f"{source.data}: the labels CSV has no column(s) {', '.join(missing)}")
    annotations = source.data / ANNOTATIONS_CSV
    boxes = read_annotations(annotations) if annotations.exists() else {}
    return Data(splits, description, boxes)


def training_shares(train: Sequence[Record], labels: Sequence[str]) -> dict[str, float]:
    """Each label's share of the training images (before any augmentation)."""
    return {k: float(np.mean([r.labels.get(k, 0.0) > 0.5 for r in train])) for k in labels}


def label_groups(shares: Mapping[str, float], config: FindingsConfig) -> dict[str, str]:
    spec = config.groups
    return {k: frequency_group(v, spec.head_share, spec.tail_share) for k, v in shares.items()}


# --- training --------------------------------------------------------------------------------


def shuffled(count: int, size: int) -> Any:
    def plan(rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(count)
        return [order[i * size : (i + 1) * size] for i in range(count // size)]

    return plan


def train_phase(
    model: FeaturePyramidSum,
    records: Sequence[Record],
    config: FindingsConfig,
    source: Source,
    *,
    epochs: int,
    learning_rate: float,
    validation: Sequence[Record],
    phase: str,
) -> None:
    """AdamW, one-cycle schedule, ASL (or BCE) over shuffled batches; validation mAP per
    epoch where a dataset folder or --patience asks for model selection."""
    spec = config.training
    steps = len(records) // spec.batch_size
    if steps == 0:
        raise ValueError(f"training set of {len(records)} is smaller than one batch")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=learning_rate, weight_decay=spec.weight_decay
    )
    schedule = Schedule(
        optimizer,
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=epochs * steps
        ),
    )
    film = FindingsFilm(tuple(config.labels), config.input_size, config.phantom_size)
    sampler = EpochBatches(shuffled(len(records), spec.batch_size), config.seed)

    def step(net: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        assert isinstance(net, FeaturePyramidSum)
        return batch_loss(spec, net.logits(batch[0]), batch[1].float())

    def validate(net: nn.Module) -> float:
        assert isinstance(net, FeaturePyramidSum)
        scores, truth = torch_scores(net, validation, film, source.run.workers)
        return mean_ap(scores[:, 1:], truth)

    run = source.run
    if run.run_dir is not None and phase != "train":
        run = type(run)(**{**run.__dict__, "run_dir": run.run_dir / phase})
    fit_streaming(
        model,
        step=step,
        train=loader(records, film, sampler, run.workers),
        sampler=sampler,
        schedule=schedule,
        epochs=epochs,
        validate=validate if source.data is not None or run.patience else None,
        metric="validation_map",
        options=run,
    )


def train_findings(
    model: FeaturePyramidSum, data: Data, config: FindingsConfig, source: Source
) -> None:
    """Seed 004's schedule: train on the original set, then (DADAM) fine-tune on it plus the
    synthetic minority-class images."""
    train, validation = data.splits["train"], data.splits["validation"]
    spec = config.training
    common = {"validation": validation}
    train_phase(
        model,
        train,
        config,
        source,
        epochs=spec.epochs,
        learning_rate=spec.learning_rate,
        phase="train",
        **common,
    )
    dadam = config.dadam
    if not (dadam.enabled and dadam.epochs):
        return
    findings = config.labels[1:]
    groups = label_groups(training_shares(train, findings), config)
    extra = dadam_records(train, findings, groups, dadam, data.boxes, config.seed)
    if not extra:
        return
    train_phase(
        model,
        [*train, *extra],
        config,
        source,
        epochs=dadam.epochs,
        learning_rate=spec.learning_rate * dadam.learning_rate_scale,
        phase="dadam",
        **common,
    )


def trained(
    config_path: Path, checkpoint: Path | None = None, source: Source | None = None
) -> tuple[FindingsConfig, Data, FeaturePyramidSum]:
    """The config, its data, and the model trained on it (or the checkpoint's weights)."""
    config = load_config(config_path)
    source = resolved(source or Source(), "findings")
    seed_everything(config.seed, config.threads)
    data = findings_data(config, source)
    model = FeaturePyramidSum(config.model, len(config.labels))
    fit(
        model,
        lambda: train_findings(model, data, config, source),
        checkpoint=checkpoint,
        engine="findings",
        config_path=config_path,
    )
    model.eval()
    return config, data, model


# --- scores ----------------------------------------------------------------------------------


def batches(
    records: Sequence[Record], film: FindingsFilm, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for images, truth in loader(records, film, in_order(len(records), BATCH), workers):
        yield images.numpy(), truth.numpy()


def torch_scores(
    model: FeaturePyramidSum, records: Sequence[Record], film: FindingsFilm, workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(findings output (N, 1 + L), labels (N, L)) by PyTorch."""
    model.eval()
    device = next(model.parameters()).device
    outputs, labels = [], []
    with torch.no_grad():
        for images, truth in batches(records, film, workers):
            outputs.append(model(torch.from_numpy(images).to(device))[1].float().cpu().numpy())
            labels.append(truth)
    return np.concatenate(outputs), np.concatenate(labels)


def onnx_scores(
    path: Path, records: Sequence[Record], film: FindingsFilm, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """(findings output (N, 1 + L), labels (N, L)) by ONNX Runtime on the exported file."""
    runner = session(path, threads)
    outputs, labels = [], []
    for images, truth in batches(records, film, 0):
        outputs.append(runner.run([FINDINGS_OUTPUT], {INPUT: images})[0])
        labels.append(truth)
    return np.concatenate(outputs).astype(np.float32), np.concatenate(labels)


def check_export(model: FeaturePyramidSum, path: Path, images: np.ndarray, threads: int) -> float:
    """Max |ONNX Runtime - PyTorch| over both outputs; ExportMismatch above TOLERANCE."""
    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(images))]
    actual = session(path, threads).run([OUTPUT, FINDINGS_OUTPUT], {INPUT: images})
    difference = 0.0
    for name, want, got in zip((OUTPUT, FINDINGS_OUTPUT), expected, actual, strict=True):
        if got.shape != want.shape:
            raise ExportMismatch(f"{path}: {name} shape {got.shape}, PyTorch gave {want.shape}")
        difference = max(difference, float(np.max(np.abs(got - want))))
    if not difference <= TOLERANCE:
        raise ExportMismatch(f"{path}: ONNX Runtime differs from PyTorch by {difference:.3g}")
    return difference


# --- metrics and operating points ------------------------------------------------------------


def mean_ap(scores: np.ndarray, truth: np.ndarray) -> float:
    """CXR-LT's mAP: the mean over classes of their AP (classes without a positive skipped)."""
    values = [average_precision(scores[:, j], truth[:, j]) for j in range(truth.shape[1])]
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def best_f1_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The lowest of the thresholds with the best F1 (score >= threshold is called)."""
    positive = truth > 0.5
    best, chosen = -1.0, 1.0
    for threshold in np.unique(scores):
        called = scores >= threshold
        tp = int((called & positive).sum())
        f1 = 2 * tp / (int(called.sum()) + int(positive.sum())) if positive.any() else 0.0
        if f1 > best:
            best, chosen = f1, float(threshold)
    return chosen


BEST_F1, SPECIFICITY, NOT_REPORTED = "best F1", "specificity", "not reported"


@dataclass(frozen=True)
class ReportChoice:
    """How a finding's `report` point was chosen on validation, and on how many films."""

    rule: str  # BEST_F1, SPECIFICITY or NOT_REPORTED
    threshold: float | None  # None: NOT_REPORTED
    positives: int
    negatives: int


def report_point(scores: np.ndarray, truth: np.ndarray, spec: ReportSpec) -> ReportChoice:
    """A finding's `report` point on validation: the best F1 with at least
    `min_positives_for_f1` positives (on two positives the best F1 is whichever threshold
    catches them, and says nothing of precision), else the lowest threshold whose
    specificity is >= `fallback_specificity`; not reported where the negatives are too few
    for that target to differ from 1 (fewer than 1 / (1 - target))."""
    positive = truth > 0.5
    positives, negatives = int(positive.sum()), int((~positive).sum())
    if positives >= spec.min_positives_for_f1:
        return ReportChoice(BEST_F1, best_f1_threshold(scores, truth), positives, negatives)
    target = spec.fallback_specificity
    if negatives * (1 - target) < 1 - 1e-9:
        return ReportChoice(NOT_REPORTED, None, positives, negatives)
    thresholds = np.unique(np.append(scores.astype(np.float64), 1.0))
    below = np.searchsorted(np.sort(scores[~positive]), thresholds, side="left")
    threshold = float(thresholds[below / negatives >= target].min())
    return ReportChoice(SPECIFICITY, threshold, positives, negatives)


@dataclass(frozen=True)
class AtPoint:
    """A finding's test counts at its `report` point: recall and precision, exact intervals."""

    true_positives: int
    called: int
    positives: int

    @classmethod
    def of(cls, scores: np.ndarray, truth: np.ndarray, threshold: float) -> AtPoint:
        called, positive = scores >= threshold, truth > 0.5
        return cls(int((called & positive).sum()), int(called.sum()), int(positive.sum()))

    @property
    def recall(self) -> float:
        return self.true_positives / self.positives if self.positives else float("nan")

    @property
    def precision(self) -> float:
        return self.true_positives / self.called if self.called else float("nan")

    def recall_ci(self) -> tuple[float, float]:
        return proportion_interval(self.true_positives, self.positives)

    def precision_ci(self) -> tuple[float, float]:
        return proportion_interval(self.true_positives, self.called)


def reported_findings(
    probabilities: Mapping[str, float],
    thresholds: Mapping[str, float],
    *,
    alpha: float,
    beta: float,
) -> Filtered[str]:
    """What the engine reports for one film: the findings at or above their thresholds,
    through seed 002's rule on P(No Finding): above alpha none of them and "No Finding";
    above beta "No Finding" added, the findings kept; else the findings alone."""
    called = [k for k, t in thresholds.items() if probabilities[k] >= t]
    return healthy_prefilter(called, probabilities[NO_FINDING], alpha=alpha, beta=beta)


@dataclass(frozen=True)
class FindingsEvaluation:
    labels: list[str]  # trained labels, "No Finding" first
    shares: dict[str, float]  # of the training images
    groups: dict[str, str]
    ap: dict[str, float]
    auc: dict[str, float]
    ci: dict[str, tuple[float, float]]  # test_map, ap_<label>, auc_<label>
    group_map: dict[str, float]
    test_map: float
    validation_map: float
    thresholds: dict[str, float]  # per reported finding, on validation
    choices: dict[str, ReportChoice]  # per finding: how its report point was chosen
    at_threshold: dict[str, AtPoint]  # per reported finding, on test
    prefilter: dict[str, float]
    ruleout: Evaluation
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # per finding, where validation allows: the `urgent` point (urgent_threshold)
    urgent: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        figures = {
            "test_map": self.test_map,
            "validation_map": self.validation_map,
            **{f"test_map_{g}": v for g, v in self.group_map.items()},
            **{f"test_ap_{key(k)}": v for k, v in self.ap.items()},
            **{f"test_auc_{key(k)}": v for k, v in self.auc.items()},
            **{f"train_share_{key(k)}": v for k, v in self.shares.items()},
            **self.prefilter,
            **{f"ruleout_{k}": v for k, v in self.ruleout.metrics().items()},
        }
        return {k: v for k, v in figures.items() if np.isfinite(v)}


def key(label: str) -> str:
    return re.sub(r"\W+", "_", label).strip("_").lower()


def evaluate_findings(
    config: FindingsConfig,
    train: Sequence[Record],
    validation: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    test_records: Sequence[Record],
) -> FindingsEvaluation:
    """Scores are the findings output (N, 1 + L) and labels (N, L), on validation and test."""
    labels = config.labels
    (val_out, val_truth), (test_out, test_truth) = validation, test
    val_scores, test_scores = val_out[:, 1:], test_out[:, 1:]
    shares = training_shares(train, labels)
    ap, aucs, ci, curves = {}, {}, {}, {}
    for j, label in enumerate(labels):
        s, y = test_scores[:, j], test_truth[:, j]
        ap[label] = average_precision(s, y)
        aucs[label] = auc(s, y) if 0 < y.sum() < len(y) else float("nan")
        ci[f"ap_{key(label)}"] = bootstrap_interval(
            lambda i, s=s, y=y: average_precision(s[i], y[i]), len(y)
        )
        ci[f"auc_{key(label)}"] = auc_bounds(s, y)
        curves[label] = (s, y)
    ci["test_map"] = bootstrap_interval(
        lambda i: mean_ap(test_scores[i], test_truth[i]), len(test_truth)
    )
    groups = label_groups(shares, config)
    for group in sorted(set(groups.values())):
        members = [j for j, k in enumerate(labels) if groups[k] == group]
        ci[f"map_{group}"] = bootstrap_interval(
            lambda i, m=members: mean_ap(test_scores[i][:, m], test_truth[i][:, m]),
            len(test_truth),
        )
    findings = labels[1:]
    choices = {
        k: report_point(val_scores[:, j + 1], val_truth[:, j + 1], config.report)
        for j, k in enumerate(findings)
    }
    thresholds = {k: c.threshold for k, c in choices.items() if c.threshold is not None}
    column = {k: j + 1 for j, k in enumerate(findings)}
    at_threshold = {
        k: AtPoint.of(test_scores[:, column[k]], test_truth[:, column[k]], t)
        for k, t in thresholds.items()
    }
    abnormal_val = (val_out[:, 0], 1.0 - val_truth[:, 0])
    return FindingsEvaluation(
        labels=labels,
        shares=shares,
        groups=label_groups(shares, config),
        ap=ap,
        auc=aucs,
        ci=ci,
        group_map=group_means(ap, label_groups(shares, config)),
        test_map=mean_ap(test_scores, test_truth),
        validation_map=mean_ap(val_scores, val_truth),
        thresholds=thresholds,
        choices=choices,
        urgent=urgent_points(
            val_scores[:, [column[k] for k in thresholds]],
            val_truth[:, [column[k] for k in thresholds]],
            thresholds,
            config.calibration.urgent_specificity,
        ),
        at_threshold=at_threshold,
        prefilter=prefilter_figures(config, labels, test_scores, test_truth, thresholds),
        ruleout=evaluate(abnormal_val, test_out[:, 0], test_records, config.calibration),
        curves=curves,
    )


def urgent_points(
    scores: np.ndarray, truth: np.ndarray, reports: Mapping[str, float], specificity: float
) -> dict[str, float]:
    """Each finding's `urgent` point (columns in `reports` order), chosen on validation as
    the rule-out engine's is: the lowest threshold with specificity >= `specificity`, never
    below the finding's `report` point; none where validation lacks positives or negatives."""
    points = {}
    for j, (finding, report) in enumerate(reports.items()):
        try:
            thresholds, _, reached = roc_table(scores[:, j], truth[:, j])
        except ValueError:
            continue
        eligible = thresholds[(reached >= specificity) & (thresholds >= report)]
        if len(eligible):
            points[finding] = float(eligible.min())
    return points


def auc_bounds(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    positives = int((truth > 0.5).sum())
    if not 0 < positives < len(truth):
        return float("nan"), float("nan")
    if auc(scores, truth) == 1.0:
        return saturated_auc_interval(positives, len(truth) - positives)

    def resampled(i: np.ndarray) -> float:
        y = truth[i]
        return auc(scores[i], y) if 0 < y.sum() < len(y) else float("nan")

    return bootstrap_interval(resampled, len(truth))


def prefilter_figures(
    config: FindingsConfig,
    labels: Sequence[str],
    scores: np.ndarray,
    truth: np.ndarray,
    thresholds: Mapping[str, float],
) -> dict[str, float]:
    """Micro precision and recall of the reported findings on test, with and without seed
    002's rule, and how often "No Finding" is reported and right."""
    spec = config.prefilter
    counts = {"with": [0, 0, 0], "without": [0, 0, 0]}  # true pos., called, positives
    healthy_right = healthy_called = 0
    for row, wanted in zip(scores, truth, strict=True):
        probabilities = dict(zip(labels, row.tolist(), strict=True))
        present = {k for k, v in zip(labels, wanted, strict=True) if v > 0.5} - {NO_FINDING}
        result = reported_findings(probabilities, thresholds, alpha=spec.alpha, beta=spec.beta)
        plain = reported_findings(probabilities, thresholds, alpha=1.0, beta=1.0)
        for name, said in (("with", set(result.boxes)), ("without", set(plain.boxes))):
            counts[name][0] += len(said & present)
            counts[name][1] += len(said)
            counts[name][2] += len(present)
        healthy_called += result.healthy
        healthy_right += result.healthy and not present
    figures = {}
    for name, (tp, calls, positives) in counts.items():
        figures[f"test_precision_{name}_prefilter"] = tp / calls if calls else float("nan")
        figures[f"test_recall_{name}_prefilter"] = tp / positives if positives else float("nan")
    figures["test_no_finding_reported_share"] = healthy_called / max(len(truth), 1)
    figures["test_no_finding_reported_precision"] = (
        healthy_right / healthy_called if healthy_called else float("nan")
    )
    return figures


# --- bundle ----------------------------------------------------------------------------------


def build(
    config_path: Path,
    out: Path,
    rebuild: str,
    checkpoint: Path | None = None,
    source: Source | None = None,
) -> Bundle:
    """Train (or load), export with both outputs, check ONNX against PyTorch, evaluate on
    ONNX Runtime's outputs, write the bundle."""
    config, data, model = trained(config_path, checkpoint, source)
    film = FindingsFilm(tuple(config.labels), config.input_size, config.phantom_size)
    with staged(out) as folder:
        onnx_path = folder / MODEL_FILE
        export_onnx(model, onnx_path, config.input_size, (OUTPUT, FINDINGS_OUTPUT))
        check = np.stack(
            [film(r, np.random.default_rng(0))[0] for r in data.splits["test"][:BATCH]]
        )
        difference = check_export(model, onnx_path, check, config.threads)
        validation = onnx_scores(onnx_path, data.splits["validation"], film, config.threads)
        test = onnx_scores(onnx_path, data.splits["test"], film, config.threads)
        evaluation = evaluate_findings(
            config, data.splits["train"], validation, test, data.splits["test"]
        )
        manifest = make_manifest(config, data, evaluation, sha256_of(onnx_path))
        draw_plots(folder, evaluation)
        card = model_card(manifest, config, evaluation, difference, rebuild)
        write_bundle(folder, manifest, card)
    return Bundle(out)


def make_manifest(
    config: FindingsConfig, data: Data, evaluation: FindingsEvaluation, sha256: str
) -> Manifest:
    ruleout, calibration = evaluation.ruleout, config.calibration
    meanings = {
        "rule_out": "Below this P(abnormal) = 1 - P(No Finding) the film is reported as 'no "
        "abnormality detected': of the validation thresholds with sensitivity >= "
        f"{calibration.rule_out_sensitivity}, the lowest with the best specificity.",
        "urgent": "At or above this P(abnormal) the film is flagged for priority reading: the "
        f"lowest validation threshold with specificity >= {calibration.urgent_specificity}, "
        "never below rule_out.",
    }
    return Manifest(
        name=config.name,
        version=config.version,
        task=TaskKind.classify,
        description="Multi-label chest radiograph findings (seed 004's Feature Pyramid Sum "
        f"Model): P(finding) for {', '.join(config.labels[1:])} and P(No Finding). The "
        "declared output is P(abnormal) = 1 - P(No Finding), against the rule-out point.",
        inputs=CHEST_FILMS,
        preprocessing=Preprocessing(size=config.input_size),
        labels=[Label(name=ABNORMAL, code=ABNORMAL_CODE)]
        + [Label(name=k, code=config.code(k)) for k in config.labels],
        operating_points=calibrated_points(ruleout, meanings),
        model=ModelFile(file=MODEL_FILE, sha256=sha256, input=INPUT, output=OUTPUT),
        findings=Findings(
            output=FINDINGS_OUTPUT,
            healthy=NO_FINDING,
            prefilter=Prefilter(alpha=config.prefilter.alpha, beta=config.prefilter.beta),
            operating_points=finding_points(evaluation, calibration.urgent_specificity),
            not_reported=[k for k, c in evaluation.choices.items() if c.threshold is None],
        ),
        provenance=provenance(
            data.description or describe(config, data),
            config.date,
            evaluation.metrics(),
            {k: v for k, v in evaluation_intervals(evaluation).items() if np.all(np.isfinite(v))},
        ),
    )


def finding_points(
    evaluation: FindingsEvaluation, urgent_specificity: float
) -> dict[str, dict[str, OperatingPoint]]:
    """Each reported finding's `report` point (report_point) and, where validation allows,
    its `urgent` point (cadnode.infer.bundle.Findings)."""
    points = {}
    for finding, threshold in evaluation.thresholds.items():
        test = evaluation.at_threshold[finding]
        own = {
            REPORT_POINT: OperatingPoint(
                threshold=round(threshold, 6),
                description=f"{finding} is reported at or above this probability ("
                f"{choice_text(evaluation.choices[finding])}; on test recall {test.recall:.3f}, "
                f"precision {test.precision:.3f}), unless seed 002's rule on P(No Finding) "
                "suppresses every finding.",
            )
        }
        if finding in evaluation.urgent:
            own["urgent"] = OperatingPoint(
                threshold=round(evaluation.urgent[finding], 6),
                description=f"At or above this probability {finding} flags the film for "
                f"priority reading: the lowest validation threshold with specificity >= "
                f"{urgent_specificity}, never below the report point.",
            )
        points[finding] = own
    return points


def choice_text(choice: ReportChoice, target: float | None = None) -> str:
    """How a report point was chosen, as the manifest and card say it."""
    on = f"on {choice.positives} validation positives, {choice.negatives} negatives"
    if choice.rule == BEST_F1:
        return f"the best F1 on validation, {on}"
    aim = f" >= {target:g}" if target is not None else ""
    if choice.rule == SPECIFICITY:
        return f"too few positives for a best-F1 point: validation specificity{aim}, {on}"
    return f"not reported: too few negatives to set a specificity{aim} point, {on}"


def evaluation_intervals(evaluation: FindingsEvaluation) -> dict[str, tuple[float, float]]:
    named = {"test_map": evaluation.ci["test_map"]}
    named |= {f"test_map_{g}": evaluation.ci[f"map_{g}"] for g in evaluation.group_map}
    for label in evaluation.labels:
        named[f"test_ap_{key(label)}"] = evaluation.ci[f"ap_{key(label)}"]
        named[f"test_auc_{key(label)}"] = evaluation.ci[f"auc_{key(label)}"]
    named |= {f"ruleout_{k}": v for k, v in evaluation.ruleout.test_ci.items()}
    return named


def describe(config: FindingsConfig, data: Data) -> str:
    """The phantom training population: counts per label and split."""
    parts = []
    for name, records in data.splits.items():
        counts = ", ".join(
            f"{int(sum(r.labels.get(k, 0) > 0.5 for r in records))} {k}" for k in config.labels
        )
        parts.append(f"{name}: {len(records)} films ({counts}).")
    return (
        "Synthetic multi-label chest phantoms (cadnode/infer/phantoms/chest.py with its extra "
        f"findings; training.findings.plan_records), {config.phantom_size} px DX, preprocessed "
        f"to {config.input_size} px; findings at long-tailed frequencies "
        + ", ".join(f"{k} {v:g}" for k, v in config.frequencies.items())
        + ". "
        + " ".join(parts)
    )


def draw_plots(folder: Path, evaluation: FindingsEvaluation) -> None:
    ruleout = evaluation.ruleout
    points = [(n, 1 - p.specificity, p.sensitivity) for n, p in ruleout.test_points.items()]
    draw_roc(folder / ROC_FILE, *ruleout.test_roc, ruleout.test_auc, points)
    draw_calibration(
        folder / CALIBRATION_FILE,
        [("P(abnormal)", ruleout.test_calibration)],
        "Held-out test calibration",
    )
    roc = Chart("Held-out test ROC per label", "1 - specificity", "sensitivity")
    pr = Chart("Held-out test precision-recall per label", "recall", "precision")
    entries = []
    for index, (label, (scores, truth)) in enumerate(evaluation.curves.items()):
        colour = PALETTE[index % len(PALETTE)]
        entries.append((f"{label} AP {evaluation.ap[label]:.2f}", colour))
        roc.line(roc_points(scores, truth), colour)
        pr.line(pr_points(scores, truth), colour)
    roc.legend(entries)
    pr.legend(entries)
    roc.save(folder / FINDINGS_ROC_FILE)
    pr.save(folder / PR_FILE)


def roc_points(scores: np.ndarray, truth: np.ndarray) -> list[tuple[float, float]]:
    positive = truth > 0.5
    if positive.all() or not positive.any():
        return []
    points = [(0.0, 0.0)]
    for threshold in np.unique(scores)[::-1]:
        called = scores >= threshold
        points.append((float(called[~positive].mean()), float(called[positive].mean())))
    return points


def pr_points(scores: np.ndarray, truth: np.ndarray) -> list[tuple[float, float]]:
    positive = truth > 0.5
    if not positive.any():
        return []
    points = []
    for threshold in np.unique(scores)[::-1]:
        called = scores >= threshold
        points.append((float(called[positive].mean()), float(positive[called].mean())))
    return points


def point_row(finding: str, choice: ReportChoice, test: AtPoint | None, target: float) -> str:
    """One finding's row of the card's report-point table."""
    rule = f"specificity >= {target:g}" if choice.rule == SPECIFICITY else choice.rule
    counts = f"{choice.positives} / {choice.negatives}"
    if choice.threshold is None or test is None:
        return f"| {finding} | {rule} | {counts} | - | - | - |"
    return (
        f"| {finding} | {rule} | {counts} | {choice.threshold:.6f} | {test.recall:.4f} "
        f"{interval(test.recall_ci())} ({test.true_positives}/{test.positives}) | "
        f"{test.precision:.4f} {interval(test.precision_ci())} "
        f"({test.true_positives}/{test.called}) |"
    )


def model_card(
    manifest: Manifest,
    config: FindingsConfig,
    evaluation: FindingsEvaluation,
    export_difference: float,
    rebuild: str,
) -> str:
    codes = {label.name: label.code for label in manifest.labels}
    rows = "\n".join(
        f"| {k} | {codes[k].scheme} {codes[k].value} {codes[k].meaning} | "
        f"{evaluation.shares[k]:.3f} | {evaluation.groups[k]} | {evaluation.ap[k]:.4f} "
        f"{interval(evaluation.ci[f'ap_{key(k)}'])} | {evaluation.auc[k]:.4f} "
        f"{interval(evaluation.ci[f'auc_{key(k)}'])} |"
        for k in evaluation.labels
    )
    groups = ", ".join(
        f"{g} {v:.4f} {interval(evaluation.ci[f'map_{g}'])}"
        for g, v in evaluation.group_map.items()
    )
    thresholds = "\n".join(
        point_row(k, c, evaluation.at_threshold.get(k), config.report.fallback_specificity)
        for k, c in evaluation.choices.items()
    )
    ruleout = evaluation.ruleout
    points = "\n".join(
        f"| `{n}` | {p.threshold:.6f} | {p.sensitivity:.4f} "
        f"{interval(ruleout.validation_ci[n][0])} | {p.specificity:.4f} "
        f"{interval(ruleout.validation_ci[n][1])} | {ruleout.test_points[n].sensitivity:.4f} | "
        f"{ruleout.test_points[n].specificity:.4f} |"
        for n, p in ruleout.operating_points.items()
    )
    pre, spec = evaluation.prefilter, config.prefilter
    model, dadam = config.model, config.dadam
    sections = [
        "## What it does\n\n" + manifest.description + " Inputs: CR/DX chest films, PA or AP, "
        f"through `cadnode.infer.preprocess.image_to_tensor` to {config.input_size} px. The "
        f"ONNX graph takes `image` (N, 1, S, S) and returns `probability` (N,) = P(abnormal) "
        f"and `{FINDINGS_OUTPUT}` (N, {len(manifest.labels)}) in label order.",
        "## Data\n\n" + manifest.provenance.training_data + "\n\n" + PHANTOM_CAVEAT,
        "## Model and training\n\nSeed 004's Feature Pyramid Sum Model: a ResNet of stage "
        f"widths {model.widths} (the paper's backbone is TResNet), an FPN of width "
        f"{model.fpn_width} whose levels {model.levels} are average-pooled to the deepest "
        "level's size and summed, a 3x3 convolution, global average and max pooling, one "
        f"linear layer. Loss: {config.training.loss.upper()} (asymmetric loss: the paper names "
        "none; ASL is TResNet's authors' multi-label loss, made for many easy negatives). "
        + (
            f"Diseased-area data augmentation (DADAM): after {config.training.epochs} epochs on "
            f"the original set, {dadam.epochs} fine-tuning epochs on it plus synthetic images "
            f"bringing each medium/tail class to {dadam.target_share:g} of the training set: "
            f"{dadam.cutmix_share:g} CutMix (a donor's box of the class pasted onto a No Finding "
            "film), the rest Mixup (a box of the class and one of its most correlated class "
            f"blended at {dadam.transparency:g} onto a film with a finding), labels added."
            if dadam.enabled and dadam.epochs
            else "No diseased-area augmentation (DADAM off)."
        ),
        "## Held-out test metrics (CXR-LT)\n\nComputed with ONNX Runtime on the shipped "
        f"`model.onnx`. mAP {evaluation.test_map:.4f} {interval(evaluation.ci['test_map'])} "
        f"(validation {evaluation.validation_map:.4f}); by group (head > "
        f"{config.groups.head_share:g}, tail < {config.groups.tail_share:g} of the training "
        f"images): {groups}. In brackets 95 % percentile bootstrap intervals (a saturated AUC: "
        "the distribution-free bound from the class counts). A tail class has a handful of "
        "test films: its AP is a rough figure.\n\n"
        "| label | code | train share | group | AP | AUC |\n|---|---|---|---|---|---|\n"
        + rows
        + f"\n\n![ROC per label]({FINDINGS_ROC_FILE})\n\n![Precision-recall per label]({PR_FILE})",
        "## Reported findings\n\nEach finding is reported at or above its threshold, chosen on "
        f"validation: the best F1 where the label has >= {config.report.min_positives_for_f1} "
        "validation positives (on fewer, the best-F1 point is whichever threshold catches "
        "them and says nothing of precision), else the lowest threshold with validation "
        f"specificity >= {config.report.fallback_specificity:g}; a label with too few "
        "validation negatives even for that is not reported (`findings.not_reported`). Then "
        f"seed 002's two-class rule on P(No Finding) with alpha {spec.alpha:g} and beta "
        f"{spec.beta:g} (the paper's): above alpha only 'No Finding' is reported, above beta it "
        "is added to the findings. Test recall and precision at the point with 95 % "
        "Clopper-Pearson exact intervals (counts in parentheses).\n\n"
        "| finding | chosen by | val. positives / negatives | threshold | test recall "
        "| test precision |\n|---|---|---|---|---|---|\n"
        + thresholds
        + f"\n\nOn test, micro precision / recall of the reported findings: "
        f"{pre['test_precision_with_prefilter']:.4f} / {pre['test_recall_with_prefilter']:.4f} "
        f"with the rule, {pre['test_precision_without_prefilter']:.4f} / "
        f"{pre['test_recall_without_prefilter']:.4f} without; 'No Finding' reported on "
        f"{pre['test_no_finding_reported_share']:.3f} of the films.",
        "## Rule-out operating points\n\nP(abnormal) = 1 - P(No Finding), calibrated on "
        "validation as the cxr-ruleout engine is (Clopper-Pearson intervals in brackets).\n\n"
        "| point | threshold | val. sensitivity | val. specificity | test sensitivity "
        "| test specificity |\n|---|---|---|---|---|---|\n"
        + points
        + f"\n\nTest AUC of P(abnormal) {ruleout.test_auc:.4f}.\n\n"
        f"![ROC of P(abnormal)]({ROC_FILE})\n\n![Calibration]({CALIBRATION_FILE})",
    ]
    return compose_card(
        manifest, sections, export_difference=export_difference, rebuild=rebuild, config=config
    )
