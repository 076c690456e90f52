"""The seeds' metrics, each written as its paper defines it.

- Seed 000 (Chang & Huang, Table 2): TPR, TNR, FPR, accuracy, F1, and F1-CV, the coefficient
  of variation of F1 over repeated training trials (SD / mean; sample SD, ddof=1).
- Seed 001 (Zidan, Sec. 4): Dice per image, set to 1 when prediction and truth are both empty
  and averaged over images ("Dice_adjusted", from the SIIM organisers), and pooled Dice over
  all pixels of all images ("assess all the samples as a whole").
- AUC (ties count half) and percentile bootstrap confidence intervals (seed 003 A.8 used
  2000 bootstraps for its CIs). A bootstrap collapses where the statistic is at its bound
  (300/300 resamples to 1.0 every time), so proportions get exact Clopper-Pearson intervals
  and a saturated AUC (1.0) a distribution-free lower bound from the class counts.
FROC with the Duke rule is in `training.froc`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cadnode.watch.performance import proportion


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary decision against the truth, and the rates seed 000 reports."""

    tp: int
    fp: int
    tn: int
    fn: int

    @classmethod
    def of(cls, predicted: np.ndarray, truth: np.ndarray) -> Confusion:
        called, positive = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
        return cls(
            tp=int((called & positive).sum()),
            fp=int((called & ~positive).sum()),
            tn=int((~called & ~positive).sum()),
            fn=int((~called & positive).sum()),
        )

    @property
    def tpr(self) -> float:
        """Sensitivity, recall: TP / (TP + FN)."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def tnr(self) -> float:
        """Specificity: TN / (TN + FP)."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def fpr(self) -> float:
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN), i.e. 2 P R / (P + R); 0 when there is nothing to find
        and nothing was called (no positive anywhere: F1 is undefined, reported as 0)."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def rates(self) -> dict[str, float]:
        return {
            "tpr": self.tpr,
            "tnr": self.tnr,
            "fpr": self.fpr,
            "accuracy": self.accuracy,
            "f1": self.f1,
        }


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator else 0.0


def coefficient_of_variation(values: Sequence[float]) -> float:
    """SD / mean with the sample SD (ddof=1): seed 000's F1-CV over its eight trials."""
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        raise ValueError("a coefficient of variation needs at least two trials")
    mean = float(array.mean())
    return float(array.std(ddof=1)) / mean if mean else float("inf")


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|) of one image; 1 when both are empty (seed 001's convention)."""
    a, b = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def dice_per_image(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """Mean over images of `dice` (empty/empty = 1): seed 001's "Dice per image"."""
    if len(predicted) != len(truth) or not len(truth):
        raise ValueError("need as many predicted masks as true ones, and at least one")
    return float(np.mean([dice(p, t) for p, t in zip(predicted, truth, strict=True)]))


def pooled_dice(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """Dice over all pixels of all images at once (1 when everything is empty)."""
    overlap = sum(
        int((np.asarray(p, bool) & np.asarray(t, bool)).sum())
        for p, t in zip(predicted, truth, strict=True)
    )
    total = sum(int(np.asarray(p, bool).sum()) for p in predicted) + sum(
        int(np.asarray(t, bool).sum()) for t in truth
    )
    return 1.0 if total == 0 else 2.0 * overlap / total


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties count half."""
    positive = np.asarray(labels) > 0.5
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    count: int,
    *,
    rounds: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic(indices)` over `count` cases resampled with
    replacement; rounds whose statistic is undefined (NaN, e.g. no positive drawn) are
    skipped."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, count, count)) for _ in range(rounds)]
    finite = np.array([v for v in values if np.isfinite(v)])
    if not len(finite):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def proportion_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson exact interval of a binomial proportion (sensitivity, specificity, a
    rate): never collapses, 300/300 gives [0.9878, 1]. NaN when there are no trials."""
    found = proportion(successes, trials, level)  # the node's, one piece of code for both
    if found.low is None or found.high is None:
        return float("nan"), float("nan")
    return found.low, found.high


def saturated_auc_interval(
    positives: int, negatives: int, level: float = 0.95
) -> tuple[float, float]:
    """An interval for an AUC observed at 1.0 (every positive above every negative), where a
    bootstrap only ever sees 1.0. With t the lowest positive score, AUC = P(X > Y) >=
    P(X >= t) P(Y < t). P(X >= t) >= (a/2)^(1/m) with probability 1 - a/2 (the share of
    positives below the sample minimum is Beta(1, m)); given t, all n negatives fell below it,
    so P(Y < t) >= (a/2)^(1/n) with probability 1 - a/2 (Clopper-Pearson, n/n). Both hold
    with probability >= 1 - a: a distribution-free lower bound (150 + 150 cases: 0.952)."""
    if positives == 0 or negatives == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    return tail ** (1 / positives) * tail ** (1 / negatives), 1.0


# --- multi-label (seed 004, CXR-LT) ----------------------------------------------------------

# CXR-LT groups classes by their share of the training images: head above 10 %, medium 1-10 %,
# tail below 1 % (the CXR-LT 2023 overview's grouping; seed 004 itself gives none).
HEAD_SHARE, TAIL_SHARE = 0.10, 0.01
GROUPS = ("head", "medium", "tail")


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP as CXR-LT scores it (scikit-learn's `average_precision_score`): sum over the
    distinct thresholds, from the highest score down, of precision there times the recall
    gained, sum_n (R_n - R_{n-1}) P_n; tied scores enter together. NaN without a positive."""
    y = np.asarray(labels) > 0.5
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranked, hits = np.asarray(scores, dtype=np.float64)[order], y[order]
    true_positives = np.cumsum(hits)
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True]  # a threshold ends at each tie
    tp, called = true_positives[last_of_tie], np.flatnonzero(last_of_tie) + 1
    recall_gain = np.diff(np.r_[0, tp]) / positives
    return float((recall_gain * tp / called).sum())


def frequency_group(share: float, head: float = HEAD_SHARE, tail: float = TAIL_SHARE) -> str:
    """head, medium or tail by a class's share of the training images."""
    return "head" if share > head else "tail" if share < tail else "medium"


def group_means(
    values: dict[str, float], groups: dict[str, str]
) -> dict[str, float]:
    """The mean of `values` (e.g. per-class AP) over each group's classes (NaN-skipping;
    groups without a class are left out)."""
    means = {}
    for group in GROUPS:
        members = [values[c] for c, g in groups.items() if g == group and np.isfinite(values[c])]
        if members:
            means[group] = float(np.mean(members))
    return means
