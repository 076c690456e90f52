"""The model cards' plots (ROC, FROC, calibration) as small PNGs drawn with Pillow.

Pillow rather than matplotlib: one dependency fewer, and the same inputs give the same bytes,
which keeps bundles reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIDE, MARGIN = 360, 40
COLOURS = ("navy", "darkorange", "green", "red", "purple")


@dataclass
class Chart:
    """A square plot area mapping (x, y) in [x_max, y_max] to pixels."""

    title: str
    x_label: str
    y_label: str
    x_max: float = 1.0
    y_max: float = 1.0
    image: Image.Image = field(init=False)
    draw: ImageDraw.ImageDraw = field(init=False)

    def __post_init__(self) -> None:
        self.image = Image.new("RGB", (SIDE, SIDE), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.draw.rectangle([self.at(0, self.y_max), self.at(self.x_max, 0)], outline="black")
        self.draw.text((MARGIN, 10), self.title, fill="black")
        self.draw.text((MARGIN, SIDE - MARGIN + 16), self.x_label, fill="black")
        self.draw.text((4, MARGIN - 16), self.y_label, fill="black")
        for fraction in (0.0, 0.5, 1.0):  # tick labels at both ends and the middle
            x, _ = self.at(fraction * self.x_max, 0)
            self.draw.text((x - 6, SIDE - MARGIN + 1), f"{fraction * self.x_max:g}", fill="gray")
            _, y = self.at(0, fraction * self.y_max)
            self.draw.text((MARGIN - 22, y - 6), f"{fraction * self.y_max:g}", fill="gray")

    def at(self, x: float, y: float) -> tuple[float, float]:
        span = SIDE - 2 * MARGIN
        return MARGIN + x / self.x_max * span, SIDE - MARGIN - y / self.y_max * span

    def line(self, points: Sequence[tuple[float, float]], colour: str, width: int = 2) -> None:
        if len(points) >= 2:
            self.draw.line([self.at(x, y) for x, y in points], fill=colour, width=width)

    def marker(self, x: float, y: float, label: str, colour: str, row: int = 0) -> None:
        px, py = self.at(x, y)
        self.draw.ellipse([px - 4, py - 4, px + 4, py + 4], outline=colour, width=2)
        self.draw.text((px + 6, py + 2 + 12 * row), label, fill=colour)  # rows: points may meet

    def legend(self, entries: Sequence[tuple[str, str]]) -> None:
        for row, (label, colour) in enumerate(entries):
            self.draw.text((MARGIN + 8, MARGIN + 6 + 12 * row), label, fill=colour)

    def save(self, path: Path) -> None:
        self.image.save(path, optimize=False)


def draw_roc(
    path: Path,
    fpr: np.ndarray,
    tpr: np.ndarray,
    auc: float,
    points: Sequence[tuple[str, float, float]],
) -> None:
    """ROC curve with operating points given as (name, 1 - specificity, sensitivity)."""
    chart = Chart(f"Held-out test ROC, AUC {auc:.4f}", "1 - specificity", "sensitivity")
    chart.line([(0, 0), (1, 1)], "lightgray", 1)
    steps = sorted(zip(fpr.tolist(), tpr.tolist(), strict=True))
    chart.line([(0, 0), *steps, (1, 1)], "navy")
    for row, (name, x, y) in enumerate(points):
        chart.marker(x, y, name, ("green", "red")[row % 2], row)
    chart.save(path)


def draw_froc(
    path: Path,
    curves: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    max_fp: float = 4.0,
    marked_fp: float = 2.0,
) -> None:
    """FROC curves (name, FPs per volume, sensitivity), each carried flat to `max_fp`, with
    the sensitivity at `marked_fp` marked (seed 003 A.8 reports 2 FP per volume)."""
    chart = Chart("Held-out test FROC", "false positives per volume", "sensitivity", max_fp)
    for index, (_, fps, sensitivity) in enumerate(curves):
        colour = COLOURS[index % len(COLOURS)]
        points = [(min(f, max_fp), s) for f, s in zip(fps, sensitivity, strict=True)]
        points.append((max_fp, points[-1][1] if points else 0.0))
        chart.line(points, colour)
        at = float(np.interp(marked_fp, list(fps), list(sensitivity))) if fps else 0.0
        chart.marker(marked_fp, at, f"{at:.2f}", colour, index)
    chart.legend([(name, COLOURS[i % len(COLOURS)]) for i, (name, _, _) in enumerate(curves)])
    chart.save(path)


def calibration_bins(
    probabilities: np.ndarray, outcomes: np.ndarray, bins: int = 10
) -> list[tuple[float, float, int]]:
    """(mean predicted probability, observed positive fraction, count) of each non-empty bin."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    y = np.asarray(outcomes, dtype=bool).reshape(-1)
    index = np.minimum((p * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            rows.append((float(p[inside].mean()), float(y[inside].mean()), int(inside.sum())))
    return rows


def draw_calibration(
    path: Path, series: Sequence[tuple[str, Sequence[tuple[float, float, int]]]], title: str
) -> None:
    """Reliability diagram: observed fraction against mean predicted probability per bin."""
    chart = Chart(title, "mean predicted probability", "observed fraction")
    chart.line([(0, 0), (1, 1)], "lightgray", 1)
    for index, (_, rows) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        chart.line([(x, y) for x, y, _ in rows], colour)
        for x, y, _ in rows:
            px, py = chart.at(x, y)
            chart.draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    chart.legend([(name, COLOURS[i % len(COLOURS)]) for i, (name, _) in enumerate(series)])
    chart.save(path)
