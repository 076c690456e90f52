"""Typed engine answers (cadnode.infer.answers) shaped as the shipped engines give them, for
the tests of conditions, routing cascades and the priority policy."""

from __future__ import annotations

from cadnode.infer.answers import (
    Box,
    ClassifyAnswer,
    DetectAnswer,
    DetectFinding,
    PointReached,
    SegmentAnswer,
    SegmentFinding,
)
from cadnode.infer.bundle import Code, Label

ABNORMAL = Label(name="abnormal", code=Code(value="263654008", scheme="SCT", meaning="Abnormal"))
RIGHT_LUNG = Label(
    name="right_lung", code=Code(value="3341006", scheme="SCT", meaning="Right lung")
)
LEFT_LUNG = Label(name="left_lung", code=Code(value="44029006", scheme="SCT", meaning="Left lung"))
PNEUMOTHORAX = Label(
    name="pneumothorax", code=Code(value="36118008", scheme="SCT", meaning="Pneumothorax")
)
MASS = Label(
    name="mass", code=Code(value="129788004", scheme="SCT", meaning="Mammographic breast mass")
)


def point(threshold: float, value: float) -> PointReached:
    return PointReached(threshold=threshold, reached=value >= threshold)


def ruleout_answer(
    probability: float, threshold: float = 0.47, urgent: float = 0.9
) -> ClassifyAnswer:
    """cxr-ruleout: `rule_out` and `urgent` operating points; ruled out below `threshold`."""
    return ClassifyAnswer(
        label=ABNORMAL,
        probability=probability,
        operating_points={
            "rule_out": point(threshold, probability),
            "urgent": point(urgent, probability),
        },
        ruled_out=probability < threshold,
    )


def segment(
    label: Label, number: int, probability: float, present: bool, **measurements: float
) -> SegmentFinding:
    return SegmentFinding(
        label=label,
        segment_number=number,
        probability=probability,
        operating_points={"present": PointReached(threshold=0.5, reached=present)},
        measurements=measurements,
    )


def segmenter_answer(percent: float | None) -> SegmentAnswer:
    """cxr-segmenter: both lungs, and a pneumothorax of `percent` % of the hemithorax (None:
    its segment is empty)."""
    if percent is None:
        pneumothorax = segment(PNEUMOTHORAX, 3, 0.2, False, area_px=0.0)
    else:
        pneumothorax = segment(
            PNEUMOTHORAX, 3, 0.9, True, area_px=400.0, area_mm2=900.0,
            percent_of_hemithorax=percent,
        )
    lungs = [
        segment(RIGHT_LUNG, 1, 0.99, True, area_px=5000.0, area_mm2=11250.0),
        segment(LEFT_LUNG, 2, 0.99, True, area_px=4500.0, area_mm2=10125.0),
    ]
    return SegmentAnswer(
        mask_file="study/1/cxr-segmenter/masks.npz",
        frames=1,
        rows=256,
        columns=256,
        pixel_spacing_mm=(1.5, 1.5),
        findings=[*lungs, pneumothorax],
    )


def detector_answer(*scores: float, report: float = 0.6) -> DetectAnswer:
    """dbt-detector: a volume whose candidate masses score `scores`; those at or above
    `report` are its findings, each spanning frames 3 to 7 (best at 5)."""
    findings = [
        DetectFinding(
            label=MASS,
            probability=score,
            operating_points={"report": point(report, score)},
            box=Box(x=10.0, y=20.0, width=30.0, height=40.0, frame=5, first_frame=3, depth=5),
            measurements={"width_mm": 3.0, "height_mm": 4.0},
        )
        for score in sorted(scores, reverse=True)
        if score >= report
    ]
    best = max((finding.probability for finding in findings), default=0.0)
    return DetectAnswer(
        frames=9,
        rows=128,
        columns=96,
        pixel_spacing_mm=(0.1, 0.1),
        label=MASS,
        probability=best,
        operating_points={"report": PointReached(threshold=report, reached=bool(findings))},
        findings=findings,
    )
