"""The Duke BCS-DBT true-positive rule (seed 003 A.8), the one copy of it: training's FROC
(training/froc.py) scores a detector against the truth with it, and the agreement of a
shadow detector with the live one (cadnode/watch/agreement.py) matches their boxes with it.

A predicted box hits a reference box when its centre lies within max(half the reference
box's diagonal, 100 px) of the reference box's centre and its centre slice within a quarter
of the volume's slices of the reference's slice; both bounds inclusive, as the published
code compares (<=). Among several reference boxes hit, the nearest by 3D centre distance
counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_DISTANCE_PX = 100.0  # the published rule; pixels of the volume the boxes are drawn on


@dataclass(frozen=True)
class Region:
    """A box in a volume: top-left corner (`x` column, `y` row), size in pixels, and the
    slice it is centred on (fractional: a prediction's first slice plus half its depth)."""

    x: float
    y: float
    width: float
    height: float
    slice: float

    @property
    def centre(self) -> tuple[float, float, float]:
        return self.x + self.width / 2, self.y + self.height / 2, self.slice


def is_hit(
    predicted: Region, reference: Region, slice_offset: float, min_distance: float = MIN_DISTANCE_PX
) -> bool:
    """The Duke rule: centre within max(half the reference diagonal, min_distance), slice
    within `slice_offset` (a quarter of the volume's slices)."""
    (px, py, pz), (rx, ry, rz) = predicted.centre, reference.centre
    radius = max(math.hypot(reference.width, reference.height) / 2, min_distance)
    return math.hypot(px - rx, py - ry) <= radius and abs(pz - rz) <= slice_offset


def distance_3d(predicted: Region, reference: Region) -> float:
    """Between the centres, slices counted as pixels: what breaks a tie between hits."""
    return math.dist(predicted.centre, reference.centre)
