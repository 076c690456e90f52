"""Seed 002's 2-class "healthy chest" pre-filter (2CC) in front of a detector.

A binary classifier's P(healthy) gates the detector's boxes: above alpha the boxes are
replaced by the "healthy chest" finding (the paper's 1-pixel "no finding" box), above beta that
finding is added while the boxes are kept (the classifier is not sure enough to overrule the
detector), below beta the boxes pass unchanged. The paper's best values: alpha 0.997, beta 0.3
(they lifted the test mAP from 0.186 to 0.242). With the cxr-ruleout engine as the classifier,
P(healthy) = 1 - P(abnormal).

No engine calls it yet: the paper applies it on top of a multi-finding chest box detector's
output (VinBigData), and none of the shipped engines is one (the segmenter's gate is seed
001's cascade, the DBT detector has no healthy-breast classifier). It belongs to issue 20's
chest-findings engine, where it decides which findings are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

ALPHA, BETA = 0.997, 0.3
Box = TypeVar("Box")


@dataclass(frozen=True)
class Filtered(Generic[Box]):
    boxes: list[Box]
    healthy: bool  # whether the "healthy chest" finding is reported


def healthy_prefilter(
    boxes: Sequence[Box], p_healthy: float, *, alpha: float = ALPHA, beta: float = BETA
) -> Filtered[Box]:
    if not 0 <= beta <= alpha <= 1:
        raise ValueError("the pre-filter needs 0 <= beta <= alpha <= 1")
    if p_healthy > alpha:
        return Filtered([], healthy=True)
    return Filtered(list(boxes), healthy=p_healthy > beta)
