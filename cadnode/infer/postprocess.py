"""Model output to answer, per task kind: the one post-processing path of the daemon and training.

- classify: the probability against the manifest's operating points (`rule_out`, `urgent`);
  a multi-label engine's (`findings` in the manifest) each finding against its own points,
  through seed 002's two-class rule on its healthy label (`label_findings`).
- segment: one probability map per label at the model resolution -> the label's threshold
  (the manifest's operating point named after the label), the largest connected component(s),
  mapped back to the source image (padding cut off, scale undone: resized to the source rows
  x columns), and measured: area in pixels and mm², and for a pneumothorax the percent of
  its hemithorax.
- detect: per-slice grid boxes (score, x, y, width, height in model pixels, decoded by the
  exported graph) fused across the slices of a volume with weighted box fusion
  (ensemble-boxes, seed 002/003), mapped to source pixels with 1-based frame numbers.

Training (`training/detector.py`) fuses and maps boxes with the same functions, so the Duke
predictions a bundle is evaluated on and the daemon's answers agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cadnode.infer.answers import (
    RULE_OUT,
    Box,
    ClassifyAnswer,
    DetectAnswer,
    DetectFinding,
    Healthy,
    LabelFinding,
    PointReached,
    SegmentAnswer,
    SegmentFinding,
)
from cadnode.infer.bundle import Label, Manifest, OperatingPoint, finding_labels
from cadnode.infer.preprocess import Geometry

PNEUMOTHORAX, RIGHT_LUNG, LEFT_LUNG = "pneumothorax", "right_lung", "left_lung"
DEFAULT_PIXEL_THRESHOLD = 0.5  # a segment label without its own operating point
# Connected components smaller than this share of the label's largest are dropped: specks of
# noise go, a second real component (a bilateral pneumothorax) stays.
KEEP_COMPONENT_FRACTION = 0.25
REPORT, CANDIDATES = "report", "candidates"


def reached(points: dict[str, OperatingPoint], value: float) -> dict[str, PointReached]:
    return {
        name: PointReached(
            threshold=point.threshold,
            reached=value >= point.threshold,
            description=point.description,
        )
        for name, point in points.items()
    }


# --- classify --------------------------------------------------------------------------------


def classify_answer(
    manifest: Manifest, probability: float, per_label: Sequence[float] | None = None
) -> ClassifyAnswer:
    """The declared output's probability against the manifest's operating points; for a
    multi-label engine (manifest.findings) also `per_label`, its findings output's row (one
    probability per label, in `labels` order), through `label_findings`."""
    points = manifest.operating_points
    rule_out = points.get(RULE_OUT)
    findings, healthy = label_findings(manifest, per_label)
    return ClassifyAnswer(
        label=manifest.labels[0],
        probability=probability,
        operating_points=reached(points, probability),
        ruled_out=None if rule_out is None else probability < rule_out.threshold,
        findings=findings,
        healthy=healthy,
    )


def label_findings(
    manifest: Manifest, per_label: Sequence[float] | None
) -> tuple[list[LabelFinding], Healthy | None]:
    """Each finding's probability against its own operating points, and the healthy label
    with seed 002's rule: above alpha every finding is suppressed (reaches no point), so
    only the healthy label is reported; above beta it is reported beside the findings."""
    spec = manifest.findings
    if spec is None:
        return [], None
    if per_label is None or len(per_label) != len(manifest.labels):
        got = "none" if per_label is None else str(len(per_label))
        raise ValueError(
            f"{manifest.name}: the {spec.output!r} output has {got} probabilities per image, "
            f"expected one per label ({len(manifest.labels)})"
        )
    pairs = zip(manifest.labels, per_label, strict=True)
    by_name = {label.name: (label, float(p)) for label, p in pairs}
    healthy = None
    if spec.healthy is not None:
        label, p = by_name[spec.healthy]
        prefilter = spec.prefilter
        healthy = Healthy(
            label=label,
            probability=p,
            alpha=prefilter.alpha if prefilter else None,
            beta=prefilter.beta if prefilter else None,
        )
    suppressed = healthy is not None and healthy.suppressed
    findings = []
    for name in finding_labels(manifest):
        label, p = by_name[name]
        # A not_reported finding has no points: kept with its probability, never reported.
        points = reached(spec.operating_points.get(name, {}), p)
        if suppressed:
            points = {k: v.model_copy(update={"reached": False}) for k, v in points.items()}
        findings.append(LabelFinding(label=label, probability=p, operating_points=points))
    return findings, healthy


# --- segment ---------------------------------------------------------------------------------


def image_area(plane: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The part of a model-space (S, S) map that holds the image, padding cut off."""
    rows = max(1, round(geometry.source_rows * geometry.scale))
    columns = max(1, round(geometry.source_columns * geometry.scale))
    top, left = geometry.pad_top, geometry.pad_left
    return plane[top : top + rows, left : left + columns]


def to_source(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A mask on the image area (image_area) resized to the source rows x columns: bilinear,
    then halfway, which keeps edges where nearest-neighbour would make them steps."""
    resized = Image.fromarray(mask.astype(np.float32), mode="F").resize(
        (geometry.source_columns, geometry.source_rows), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32) >= 0.5


def largest_components(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component, and any other at least KEEP_COMPONENT_FRACTION of it."""
    labelled, count = _components(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labelled.ravel())[1:]
    keep = np.flatnonzero(sizes >= KEEP_COMPONENT_FRACTION * sizes.max()) + 1
    return np.isin(labelled, keep)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The 8-connected components of a mask, labelled 1..count."""
    # scipy's import costs a second: paid here, not by every `cadnode` command.
    from scipy import ndimage

    labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return labelled, int(count)


def pixel_threshold(manifest: Manifest, label: Label) -> float:
    point = manifest.operating_points.get(label.name)
    return DEFAULT_PIXEL_THRESHOLD if point is None else point.threshold


@dataclass(frozen=True)
class Segmentation:
    """One image's masks in source pixels, and each label's highest probability inside them."""

    masks: np.ndarray  # bool (labels, rows, columns), labels in manifest order
    peaks: list[float]


def segment(manifest: Manifest, probabilities: np.ndarray, geometry: Geometry) -> Segmentation:
    """(labels, S, S) probabilities -> masks on the source image. Thresholds apply at the
    model's resolution, where they were chosen (training/segmenter.py); only the mask is
    resized."""
    masks, peaks = [], []
    for label, plane in zip(manifest.labels, probabilities, strict=True):
        area = image_area(plane, geometry)
        kept = largest_components(area >= pixel_threshold(manifest, label))
        mask = to_source(kept, geometry)
        masks.append(mask)
        peaks.append(float(area[kept].max()) if mask.any() else 0.0)
    return Segmentation(np.stack(masks), peaks)


def hemithorax_percent(masks: dict[str, np.ndarray]) -> float | None:
    """Pneumothorax area as a percent of its hemithorax, on the worse side.

    The hemithorax of a side is the union of that side's lung field and the pneumothorax
    on that side: a union, not a sum, so the figure is right whether the lung label covers
    only the aerated lung (then it is area / (area + lung) as usually quoted) or the whole
    lung outline including the collapsed part (as the phantoms' and the shipped segmenter's
    do). Each pneumothorax component belongs to the side whose lung field it touches most;
    one touching neither goes to the lung whose centroid is nearer, or without lung fields
    to the image half (patient's right on the image left, as chest films are displayed).
    None when there is no pneumothorax or no lung field at all.
    """
    pneumothorax = masks.get(PNEUMOTHORAX)
    right, left = masks.get(RIGHT_LUNG), masks.get(LEFT_LUNG)
    if pneumothorax is None or right is None or left is None or not pneumothorax.any():
        return None
    if not (right.any() or left.any()):
        return None
    labelled, count = _components(pneumothorax)
    on_side = {RIGHT_LUNG: np.zeros_like(pneumothorax), LEFT_LUNG: np.zeros_like(pneumothorax)}
    for index in range(1, count + 1):
        component = labelled == index
        on_side[_side_of(component, right, left)] |= component
    percents = [
        100.0 * float(part.sum()) / float((part | lung).sum())
        for part, lung in ((on_side[RIGHT_LUNG], right), (on_side[LEFT_LUNG], left))
        if part.any()
    ]
    return max(percents)


def _side_of(component: np.ndarray, right: np.ndarray, left: np.ndarray) -> str:
    overlap_right, overlap_left = int((component & right).sum()), int((component & left).sum())
    if overlap_right != overlap_left:
        return RIGHT_LUNG if overlap_right > overlap_left else LEFT_LUNG
    centre = np.argwhere(component).mean(axis=0)
    if right.any() and left.any():
        to_right = np.linalg.norm(centre - np.argwhere(right).mean(axis=0))
        to_left = np.linalg.norm(centre - np.argwhere(left).mean(axis=0))
        return RIGHT_LUNG if to_right <= to_left else LEFT_LUNG
    return RIGHT_LUNG if centre[1] < component.shape[1] / 2 else LEFT_LUNG


def segment_answer(
    manifest: Manifest, segmentation: Segmentation, geometry: Geometry, mask_file: str
) -> SegmentAnswer:
    """The answer for masks saved (answers.save_masks) as `mask_file`, one frame."""
    by_name = dict(zip((label.name for label in manifest.labels), segmentation.masks, strict=True))
    spacing = geometry.pixel_spacing_mm
    findings = []
    for number, (label, mask, peak) in enumerate(
        zip(manifest.labels, segmentation.masks, segmentation.peaks, strict=True), start=1
    ):
        area = float(mask.sum())
        measurements = {"area_px": area}
        if spacing is not None:
            measurements["area_mm2"] = area * spacing[0] * spacing[1]
        if label.name == PNEUMOTHORAX and (percent := hemithorax_percent(by_name)) is not None:
            measurements["percent_of_hemithorax"] = percent
        threshold = pixel_threshold(manifest, label)
        point = manifest.operating_points.get(label.name)
        findings.append(
            SegmentFinding(
                label=label,
                segment_number=number,
                probability=peak,
                operating_points={
                    "present": PointReached(
                        threshold=threshold,
                        reached=bool(mask.any()),
                        description=point.description if point else "",
                    )
                },
                measurements=measurements,
            )
        )
    return SegmentAnswer(
        mask_file=mask_file,
        frames=1,
        rows=geometry.source_rows,
        columns=geometry.source_columns,
        pixel_spacing_mm=spacing,
        findings=findings,
    )


# --- detect ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fusion:
    """How per-slice boxes are read (the detector manifest's `output.parameters`)."""

    min_score: float = 0.05  # per-slice boxes below it are dropped before fusion
    fusion_iou: float = 0.3
    breast_level: float = 0.1  # windowed value (0..1) above which a pixel is breast

    @classmethod
    def of(cls, manifest: Manifest) -> Fusion:
        parameters = manifest.output.parameters if manifest.output else {}
        return cls(**{k: float(v) for k, v in parameters.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class FusedBox:
    """A finding fused across slices. Slices are 0-based here (Duke's Slice); `peak` is the
    slice where it scores highest, `first` .. `first + depth - 1` the run it is seen on."""

    x: float
    y: float
    width: float
    height: float
    first: int
    depth: int
    peak: int
    score: float


def fuse_slices(boxes: np.ndarray, frames: np.ndarray, size: int, fusion: Fusion) -> list[FusedBox]:
    """Per-slice boxes (F, K, 5: score, x, y, w, h in model pixels) fused across slices with
    weighted box fusion; boxes in model pixels. A fused box whose centre lies outside the
    breast (the volume's maximum projection below `breast_level`) is dropped (Duke drops
    boxes mostly outside the breast)."""
    per_slice, scores, labels = [], [], []
    for slice_boxes in boxes:
        kept = slice_boxes[slice_boxes[:, 0] >= fusion.min_score]
        corners = np.stack(
            [kept[:, 1], kept[:, 2], kept[:, 1] + kept[:, 3], kept[:, 2] + kept[:, 4]], axis=1
        )
        per_slice.append(np.clip(corners / size, 0, 1).tolist())
        scores.append(kept[:, 0].tolist())
        labels.append([0] * len(kept))
    if not any(scores):
        return []
    # It brings numba (0.3 s of every node and receiver start): imported by the first fusion.
    from ensemble_boxes import weighted_boxes_fusion

    fused, fused_scores, _ = weighted_boxes_fusion(
        per_slice,
        scores,
        labels,
        iou_thr=fusion.fusion_iou,
        skip_box_thr=fusion.min_score,
        conf_type="max",
    )
    breast = frames.max(axis=0)[0] > fusion.breast_level
    results = []
    for corners, score in zip(fused * size, fused_scores, strict=True):
        x1, y1, x2, y2 = (float(v) for v in corners)
        row = min(size - 1, max(0, int((y1 + y2) / 2)))
        column = min(size - 1, max(0, int((x1 + x2) / 2)))
        if not breast[row, column]:
            continue
        first, last, peak = _slice_span(corners / size, per_slice, scores, fusion.fusion_iou)
        results.append(FusedBox(x1, y1, x2 - x1, y2 - y1, first, last - first + 1, peak, score))
    return results


def _slice_span(
    box: np.ndarray, per_slice: list[list[list[float]]], scores: list[list[float]], iou: float
) -> tuple[int, int, int]:
    """(first, last, peak): the slice where the fused box scores best, and the run of slices
    around it whose overlapping box scores at least half that (a mass is in focus on a few
    slices; faint look-alikes elsewhere in the stack do not stretch it)."""
    best = np.array([_best_overlap(box, b, s, iou) for b, s in zip(per_slice, scores, strict=True)])
    peak = int(np.argmax(best))
    strong = best >= 0.5 * best[peak]
    first, last = peak, peak
    while first > 0 and strong[first - 1]:
        first -= 1
    while last < len(best) - 1 and strong[last + 1]:
        last += 1
    return first, last, peak


def _best_overlap(
    box: np.ndarray, candidates: list[list[float]], scores: list[float], iou: float
) -> float:
    """The highest score among `candidates` overlapping `box` by at least `iou` (0 if none)."""
    if not candidates:
        return 0.0
    c = np.asarray(candidates)
    width = np.clip(np.minimum(box[2], c[:, 2]) - np.maximum(box[0], c[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], c[:, 3]) - np.maximum(box[1], c[:, 1]), 0, None)
    inter = width * height
    areas = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    union = (box[2] - box[0]) * (box[3] - box[1]) + areas - inter
    overlapping = inter / np.maximum(union, 1e-9) >= iou
    return float(np.asarray(scores)[overlapping].max()) if overlapping.any() else 0.0


def source_box(box: FusedBox, geometry: Geometry) -> FusedBox:
    """The box in source pixels (padding and scale undone), clipped to the image."""
    s = geometry.scale
    x1 = min(max((box.x - geometry.pad_left) / s, 0.0), float(geometry.source_columns))
    y1 = min(max((box.y - geometry.pad_top) / s, 0.0), float(geometry.source_rows))
    x2 = min(max((box.x + box.width - geometry.pad_left) / s, 0.0), float(geometry.source_columns))
    y2 = min(max((box.y + box.height - geometry.pad_top) / s, 0.0), float(geometry.source_rows))
    return FusedBox(x1, y1, x2 - x1, y2 - y1, box.first, box.depth, box.peak, box.score)


def detect_boxes(
    manifest: Manifest, boxes: np.ndarray, frames: np.ndarray, geometry: Geometry
) -> list[FusedBox]:
    """A volume's fused findings in source pixels, best first (all of them, any score)."""
    size = manifest.preprocessing.size
    fused = fuse_slices(boxes, frames, size, Fusion.of(manifest))
    return sorted((source_box(box, geometry) for box in fused), key=lambda b: -b.score)


def detect_answer(
    manifest: Manifest, found: Sequence[FusedBox], frames: int, geometry: Geometry
) -> DetectAnswer:
    """The answer for a volume: its findings at or above the `report` operating point."""
    points = manifest.operating_points
    report = {REPORT: points[REPORT]} if REPORT in points else {}
    threshold = points[REPORT].threshold if REPORT in points else 0.0
    label = manifest.labels[0]
    spacing = geometry.pixel_spacing_mm
    findings = [
        DetectFinding(
            label=label,
            probability=box.score,
            operating_points=reached(report, box.score),
            box=Box(
                x=box.x,
                y=box.y,
                width=box.width,
                height=box.height,
                frame=box.peak + 1,
                first_frame=box.first + 1,
                depth=box.depth,
            ),
            measurements=(
                {"width_mm": box.width * spacing[1], "height_mm": box.height * spacing[0]}
                if spacing
                else {}
            ),
        )
        for box in found
        if box.score >= threshold
    ]
    best = max((finding.probability for finding in findings), default=0.0)
    summary = {
        name: point.model_copy(update={"reached": bool(findings)})
        for name, point in reached(report, best).items()
    }
    return DetectAnswer(
        frames=frames,
        rows=geometry.source_rows,
        columns=geometry.source_columns,
        pixel_spacing_mm=spacing,
        label=label,
        probability=best,
        operating_points=summary,
        findings=findings,
    )
