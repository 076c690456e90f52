"""cxr-ruleout: a normal-vs-abnormal chest radiograph classifier trained on phantoms.

Everything the engine learns from passes through `cadnode.infer.preprocess.image_to_tensor`, the
same function the daemon calls, so training sees exactly the pixels inference will see.
Operating points are calibrated on a validation split and judged on a held-out test split;
the three splits are disjoint seed ranges of `cadnode.infer.phantoms.chest`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm import tqdm

from cadnode.core.yamlfile import load_model
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.bundle import Strict
from cadnode.infer.phantoms.chest import Case, render
from cadnode.infer.phantoms.difficulty import EASY, DifficultySetting
from cadnode.infer.preprocess import image_to_tensor
from training.metrics import auc, bootstrap_interval, proportion_interval, saturated_auc_interval
from training.plots import calibration_bins

# --- configuration ---------------------------------------------------------------------------


# Model inputs and their labels (or masks) per split name (train, validation, test).
SplitTensors = dict[str, tuple[np.ndarray, np.ndarray]]


class Split(Strict):
    """A run of consecutive phantom seeds; splits must not share a seed."""

    count: int = Field(gt=0)
    first_seed: int = Field(ge=0)

    @property
    def seeds(self) -> range:
        return range(self.first_seed, self.first_seed + self.count)


class Splits(Strict):
    train: Split
    validation: Split
    test: Split

    def named(self) -> dict[str, Split]:
        return {"train": self.train, "validation": self.validation, "test": self.test}

    @model_validator(mode="after")
    def _disjoint(self) -> Splits:
        """Overlapping seeds would leak test films into training and inflate the metrics."""
        named = list(self.named().items())
        for i, (name_a, a) in enumerate(named):
            for name_b, b in named[i + 1 :]:
                if a.seeds.start < b.seeds.stop and b.seeds.start < a.seeds.stop:
                    raise ValueError(f"seed ranges of {name_a} and {name_b} overlap")
        return self


class ModelSpec(Strict):
    channels: list[int] = Field(min_length=1, description="Width of each conv block")


class TrainSpec(Strict):
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=1)
    # Seed 000 (Chang & Huang): the share of positives in every batch (P50 = 0.5) steers the
    # model's sensitivity; it is fixed per batch instead of left to chance (their RAND mode).
    batch_positive_fraction: float = Field(default=0.5, gt=0, le=1)
    # Seed 003 A.2 (Buda): random minority oversampling (the scarcer class is cycled to fill
    # its share of every batch; the paper's best method, the default), random majority
    # undersampling (each epoch keeps as many of the commoner class as there are of the
    # scarcer, drawn afresh), or "random": batches as the data fall (seed 000's RAND).
    sampling: Literal["oversample", "undersample", "random"] = "oversample"
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    # Seed 002's augmentations (brightness, contrast, rotation; training.sources), drawn
    # per film: for real data, whose films vary as the phantoms do not.
    augment: bool = False


class CalibrationSpec(Strict):
    rule_out_sensitivity: float = Field(default=0.98, gt=0, le=1)
    urgent_specificity: float = Field(default=0.95, gt=0, le=1)


class RuleoutConfig(Strict):
    """training/configs/ruleout*.yaml."""

    name: str = "cxr-ruleout"
    version: str = "0.1.0"
    seed: int = 0
    threads: int = Field(default=2, gt=0, description="torch and ONNX Runtime threads")
    phantom_size: int = Field(default=256, gt=31)
    input_size: int = Field(default=128, gt=15)
    positive_fraction: float = Field(default=0.5, gt=0, lt=1, description="Abnormal share")
    # How hard the phantoms' findings are (cadnode.infer.phantoms.difficulty): a preset's
    # name or its fields; absent, the phantoms' original (easy) look.
    difficulty: DifficultySetting = EASY
    splits: Splits
    model: ModelSpec
    training: TrainSpec
    calibration: CalibrationSpec = CalibrationSpec()
    date: str | None = Field(
        default=None, description="Bundle date; the source commit's when absent"
    )


def load_config(path: Path) -> RuleoutConfig:
    """Read a config; errors name file:line:column (raises cadnode.core.yamlfile.ConfigError)."""
    return load_model(path, RuleoutConfig)


# --- data ------------------------------------------------------------------------------------


class Labelled(Protocol):
    """A test film as evaluation reads it: a phantom `Case` or a dataset `Record`."""

    @property
    def abnormal(self) -> bool: ...

    @property
    def finding(self) -> str: ...


def tensors(
    cases: Sequence[Case], phantom_size: int, input_size: int, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (N, 1, S, S) via the daemon's own preprocessing, and 0/1 labels (N,)."""
    progress = tqdm(cases, desc=desc, unit="film")
    images = np.stack(
        [
            image_to_tensor(render(c, phantom_size), input_size, limit=DEFAULT_LIMIT)[0]
            for c in progress
        ]
    )
    labels = np.array([case.abnormal for case in cases], dtype=np.float32)
    return images, labels


# --- model and training ----------------------------------------------------------------------


class RuleoutNet(nn.Module):
    """Conv-BN-ReLU-pool blocks, global average and max pooling, one linear logit.

    Max pooling keeps a small focal finding (an opacity, a pleural line) from being averaged
    away over the whole film. `forward` returns P(abnormal), the exported ONNX output.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        previous = 1
        for width in channels:
            blocks += [
                nn.Conv2d(previous, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * previous, 1)

    def logit(self, image: torch.Tensor) -> torch.Tensor:
        features = self.features(image)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        logits: torch.Tensor = self.head(pooled)
        return logits[:, 0]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(image))


def make_deterministic(seed: int, threads: int) -> None:
    """Same seed, same thread count, same weights: the bundle rebuilds byte for byte."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def controlled_batches(
    labels: np.ndarray, batch_size: int, positive_fraction: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of index batches, each holding the same number of positives.

    Seed 000 (Chang & Huang), batch control: fixing the positive share per batch stabilises
    training and sets the sensitivity. When the batch share exceeds the data share the
    scarcer class is cycled, i.e. random minority oversampling (seed 003 A.2, Buda).
    """
    positives, negatives = np.flatnonzero(labels > 0.5), np.flatnonzero(labels <= 0.5)
    per_batch = min(batch_size, max(1, round(batch_size * positive_fraction)))
    steps = len(labels) // batch_size
    pos = _draw(positives, steps * per_batch, rng)
    neg = _draw(negatives, steps * (batch_size - per_batch), rng)
    rows = np.hstack([pos.reshape(steps, per_batch), neg.reshape(steps, batch_size - per_batch)])
    return [rng.permutation(row) for row in rows]


def epoch_batches(
    labels: np.ndarray, spec: TrainSpec, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of index batches as `spec.sampling` and the batch share ask."""
    size = spec.batch_size
    if spec.sampling == "random":
        order = rng.permutation(len(labels))
        return [order[i * size : (i + 1) * size] for i in range(len(labels) // size)]
    if spec.sampling == "undersample":
        positives, negatives = np.flatnonzero(labels > 0.5), np.flatnonzero(labels <= 0.5)
        keep = min(len(positives), len(negatives))
        subset = np.concatenate(
            [rng.choice(positives, keep, replace=False), rng.choice(negatives, keep, replace=False)]
        )
        batches = controlled_batches(labels[subset], size, spec.batch_positive_fraction, rng)
        return [subset[batch] for batch in batches]
    return controlled_batches(labels, size, spec.batch_positive_fraction, rng)


def steps_per_epoch(labels: np.ndarray, spec: TrainSpec) -> int:
    """How many batches `epoch_batches` makes (undersampling shrinks the epoch)."""
    if spec.sampling == "undersample":
        positives = int((labels > 0.5).sum())
        return 2 * min(positives, len(labels) - positives) // spec.batch_size
    return len(labels) // spec.batch_size


def class_prior(labels: np.ndarray) -> float:
    """The abnormal class's prior as seed 003 A.2 (thesis, Buda) defines it for thresholding:
    p(i) = |i| / sum_k |k|, its frequency in the training data BEFORE any sampling (not the
    share of a batch that oversampling or batch control made)."""
    positive = np.asarray(labels) > 0.5
    if not len(positive):
        raise ValueError("a class prior needs training labels")
    return float(positive.mean())


def prior_thresholded(probability: np.ndarray, prior: float) -> np.ndarray:
    """Seed 003 A.2's thresholding: divide each class's output by its prior (`class_prior` of
    the training data before sampling) and renormalise,
    p' = (p / prior) / (p / prior + (1 - p) / (1 - prior)).
    A monotone map (AUC unchanged) that moves the 0.5 decision back to where equal priors
    would put it."""
    if not 0 < prior < 1:
        raise ValueError(f"a class prior must lie in (0, 1), not {prior}")
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-12, 1 - 1e-12)
    positive, negative = p / prior, (1 - p) / (1 - prior)
    return positive / (positive + negative)


def _draw(indices: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices from whole shuffled passes over `indices` (repeated when short)."""
    if count == 0:
        return indices[:0]
    if len(indices) == 0:
        raise ValueError("batch control needs both classes in the training set")
    passes = max(1, -(-count // len(indices)))
    return np.concatenate([rng.permutation(indices) for _ in range(passes)])[:count]


def train(
    model: RuleoutNet, images: np.ndarray, labels: np.ndarray, spec: TrainSpec, seed: int
) -> list[float]:
    """AdamW with a one-cycle schedule on binary cross-entropy; returns the mean loss per epoch."""
    rng = np.random.default_rng(seed)
    steps = steps_per_epoch(labels, spec)
    if steps == 0:
        raise ValueError(f"training set of {len(labels)} is smaller than one batch")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.learning_rate, total_steps=spec.epochs * steps
    )
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    loss_fn = nn.BCEWithLogitsLoss()
    losses: list[float] = []
    model.train()
    for _ in (bar := tqdm(range(spec.epochs), desc="train", unit="epoch")):
        total = 0.0
        for batch in epoch_batches(labels, spec, rng):
            index = torch.from_numpy(batch)
            optimizer.zero_grad()
            loss = loss_fn(model.logit(x[index]), y[index])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        losses.append(total / steps)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses


# --- calibration and metrics -----------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """A threshold and what it does: score >= threshold is called abnormal."""

    threshold: float
    sensitivity: float
    specificity: float


def roc_table(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every useful threshold (the observed scores and 1.0), ascending, with sens. and spec.

    Sensitivity only changes at a positive's score and specificity just above a negative's,
    so the observed scores are the complete set of distinct operating points.
    """
    positive = labels > 0.5
    if positive.all() or not positive.any():
        raise ValueError("calibration needs both normal and abnormal films")
    thresholds = np.unique(np.append(scores.astype(np.float64), 1.0))
    pos, neg = np.sort(scores[positive]), np.sort(scores[~positive])
    sensitivity = 1.0 - np.searchsorted(pos, thresholds, side="left") / len(pos)
    specificity = np.searchsorted(neg, thresholds, side="left") / len(neg)
    return thresholds, sensitivity, specificity


def calibrate(
    scores: np.ndarray, labels: np.ndarray, *, target_sensitivity: float, target_specificity: float
) -> dict[str, Point]:
    """The `rule_out` and `urgent` operating points (DESIGN §4).

    rule_out: of the thresholds keeping sensitivity >= target, the one with the best
    specificity, and of those the lowest (the most sensitive): a rule-out filter must not
    give away sensitivity that buys no specificity. Films below it are "no abnormality
    detected". urgent: the lowest threshold with specificity >= target, but
    never below rule_out, so no film is at once ruled out and urgent (a well separated model
    reaches the specificity target below rule_out; then urgent == rule_out).
    """
    thresholds, sensitivity, specificity = roc_table(scores, labels)
    sensitive_enough = np.flatnonzero(sensitivity >= target_sensitivity)
    best = specificity[sensitive_enough].max()
    rule_out = int(sensitive_enough[specificity[sensitive_enough] == best].min())
    meets = (specificity >= target_specificity) & (thresholds >= thresholds[rule_out])
    eligible = np.flatnonzero(meets)
    if len(eligible) == 0:
        raise ValueError(f"no threshold reaches specificity {target_specificity}")
    urgent = int(eligible.min())
    return {
        name: Point(float(thresholds[i]), float(sensitivity[i]), float(specificity[i]))
        for name, i in (("rule_out", rule_out), ("urgent", urgent))
    }


def rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> Point:
    """Sensitivity and specificity of `threshold` on another set (e.g. the held-out test)."""
    called, positive = scores >= threshold, labels > 0.5
    return Point(threshold, float(called[positive].mean()), float((~called[~positive]).mean()))


@dataclass(frozen=True)
class Evaluation:
    """Operating points chosen on validation, and how they fare on the held-out test set."""

    operating_points: dict[str, Point]  # calibrated on the validation split
    test_points: dict[str, Point]  # the same thresholds applied to the test split
    validation_auc: float
    test_auc: float
    test_sensitivity_by_finding: dict[str, float]  # at rule_out: which findings slip through
    test_roc: tuple[np.ndarray, np.ndarray]  # false positive rate, true positive rate
    # 95 % intervals: Clopper-Pearson of (sensitivity, specificity) of each point on
    # validation, and on test (test_ci's test_sensitivity_at_<point>, ...); of the test AUC a
    # percentile bootstrap, or where the AUC is saturated (1.0, the bootstrap collapses) the
    # counts' lower bound; reliability bins of P(abnormal) on test (plots.calibration_bins).
    validation_ci: dict[str, tuple[tuple[float, float], tuple[float, float]]]
    test_ci: dict[str, tuple[float, float]]
    test_calibration: list[tuple[float, float, int]]
    test_auc_saturated: bool = False

    def metrics(self) -> dict[str, float]:
        """The figures recorded in manifest provenance.metrics (rounded for reading)."""
        figures = {"validation_auc": self.validation_auc, "test_auc": self.test_auc}
        for name, point in self.test_points.items():
            figures[f"test_sensitivity_at_{name}"] = point.sensitivity
            figures[f"test_specificity_at_{name}"] = point.specificity
        for finding, sensitivity in self.test_sensitivity_by_finding.items():
            key = re.sub(r"\W+", "_", finding.replace("+", "_and_")).strip("_").lower()
            figures[f"test_sensitivity_at_rule_out_{key}"] = sensitivity
        return {name: round(value, 6) for name, value in figures.items()}


def evaluate(
    validation: tuple[np.ndarray, np.ndarray],
    test_scores: np.ndarray,
    test_cases: Sequence[Labelled],
    spec: CalibrationSpec,
) -> Evaluation:
    """Calibrate on (validation scores, labels); measure on the held-out test cases."""
    points = calibrate(
        *validation,
        target_sensitivity=spec.rule_out_sensitivity,
        target_specificity=spec.urgent_specificity,
    )
    labels = np.array([case.abnormal for case in test_cases], dtype=np.float32)
    findings = np.array([case.finding for case in test_cases])
    ruled_in = test_scores >= points["rule_out"].threshold
    _, sensitivity, specificity = roc_table(test_scores, labels)
    return Evaluation(
        operating_points=points,
        test_points={name: rates(test_scores, labels, p.threshold) for name, p in points.items()},
        validation_auc=auc(*validation),
        test_auc=auc(test_scores, labels),
        test_sensitivity_by_finding={
            finding: float(ruled_in[findings == finding].mean())
            for finding in sorted(set(findings) - {"normal"})
        },
        test_roc=(1.0 - specificity, sensitivity),
        validation_ci={
            name: point_intervals(*validation, point.threshold) for name, point in points.items()
        },
        test_ci={
            "test_auc": auc_interval(test_scores, labels),
            **test_point_intervals(test_scores, labels, points),
        },
        test_calibration=calibration_bins(test_scores, labels > 0.5),
        test_auc_saturated=auc(test_scores, labels) == 1.0,
    )


def auc_interval(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Percentile bootstrap of the AUC; at 1.0 (every resample 1.0 too) the exact lower bound
    from the class counts (metrics.saturated_auc_interval) instead."""
    if auc(scores, labels) == 1.0:
        positives = int((labels > 0.5).sum())
        return saturated_auc_interval(positives, len(labels) - positives)
    return bootstrap_interval(_resampled(auc, scores, labels), len(labels))


def test_point_intervals(
    scores: np.ndarray, labels: np.ndarray, points: dict[str, Point]
) -> dict[str, tuple[float, float]]:
    """Clopper-Pearson intervals of each point's test sensitivity and specificity, named as
    Evaluation.metrics names the figures."""
    intervals = {}
    for name, point in points.items():
        sensitivity, specificity = point_intervals(scores, labels, point.threshold)
        intervals[f"test_sensitivity_at_{name}"] = sensitivity
        intervals[f"test_specificity_at_{name}"] = specificity
    return intervals


def point_intervals(
    scores: np.ndarray, labels: np.ndarray, threshold: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Clopper-Pearson exact intervals of sensitivity and specificity at `threshold` (a
    bootstrap collapses to [1, 1] when every film is called right)."""
    called, positive = scores >= threshold, labels > 0.5
    return (
        proportion_interval(int((called & positive).sum()), int(positive.sum())),
        proportion_interval(int((~called & ~positive).sum()), int((~positive).sum())),
    )


def _resampled(
    statistic: Callable[[np.ndarray, np.ndarray], float], scores: np.ndarray, labels: np.ndarray
) -> Callable[[np.ndarray], float]:
    """`statistic` of the cases at the resampled indices; NaN when a class is missing."""

    def of(indices: np.ndarray) -> float:
        y = labels[indices]
        if statistic is auc and (y.min() == y.max()):
            return float("nan")
        return statistic(scores[indices], y)

    return of
