"""FROC with the Duke BCS-DBT true-positive rule (seed 003 A.8), as the dataset's authors
publish their evaluation (the `evaluate` function of their duke-dbt-data code, and the
per-breast curve of the detector's own evaluation script).

- Truth: the Duke box CSV (PatientID, StudyUID, View, Slice, X, Y, Width, Height, Class,
  VolumeSlices): one rectangle on the central slice of each lesion.
- Predictions: PatientID, StudyUID, View, X, Y, Z, Width, Height, Depth, Score; Z is the first
  slice and Depth the number of slices, so the predicted centre slice is Z + Depth / 2.
- A prediction is a true positive of a lesion in its volume when its centre lies within
  max(half the lesion box diagonal, 100 px) of the lesion box centre and its centre slice is
  within a quarter of the volume's slices of the lesion's slice (VolumeSlices / 4; where the
  truth does not give VolumeSlices, max(Z + Depth) of the volume's predictions / 4, as the
  detector's evaluation script does). Both bounds are inclusive (the code uses <=). A
  prediction matching several lesions counts for the nearest (3D centre distance).
- Sensitivity at a threshold: lesions hit by at least one prediction scoring >= it, over all
  lesions; false positives: predictions scoring >= it that hit no lesion (a second hit on the
  same lesion is neither), over the number of volumes. The curve is taken at every score of a
  true positive (plus above and below all scores) and the sensitivity at 0.25, 0.5, 1, 2 and
  4 FP per volume is interpolated linearly on it (numpy.interp).
- Breast-based: a breast (patient, study, laterality = first letter of View) with lesions is
  found when any prediction on any of its views is a true positive; FPs as above.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cadnode.infer.froc_rule import MIN_DISTANCE_PX as MIN_DISTANCE_PX  # cadnode-train's default
from cadnode.infer.froc_rule import Region, distance_3d, is_hit
from training.datasets import DukeBox, read_rows, require_columns, write_rows

PREDICTION_HEADER = (
    "PatientID", "StudyUID", "View", "X", "Y", "Z", "Width", "Height", "Depth", "Score"
)  # fmt: skip
EVALUATION_FPS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Prediction:
    patient_id: str
    study_uid: str
    view: str
    x: float
    y: float
    z: int  # first slice
    width: float
    height: float
    depth: int  # number of slices
    score: float

    @property
    def volume(self) -> tuple[str, str, str]:
        return self.patient_id, self.study_uid, self.view

    def row(self) -> list[object]:
        return [
            *self.volume,
            self.x,
            self.y,
            self.z,
            self.width,
            self.height,
            self.depth,
            self.score,
        ]


def read_predictions(path: Path) -> list[Prediction]:
    rows = read_rows(path)
    require_columns(path, rows, PREDICTION_HEADER)
    return [
        Prediction(
            row["PatientID"],
            row["StudyUID"],
            row["View"].lower(),
            float(row["X"]),
            float(row["Y"]),
            int(float(row["Z"])),
            float(row["Width"]),
            float(row["Height"]),
            int(float(row["Depth"])),
            float(row["Score"]),
        )
        for row in rows
    ]


def write_predictions(path: Path, predictions: Iterable[Prediction]) -> None:
    write_rows(path, PREDICTION_HEADER, (p.row() for p in predictions))


def is_true_positive(
    prediction: Prediction, box: DukeBox, slice_offset: float, min_distance: float = MIN_DISTANCE_PX
) -> bool:
    """The Duke rule (cadnode.infer.froc_rule): centre within max(half GT diagonal,
    min_distance), slice within offset."""
    return is_hit(_predicted(prediction), _lesion(box), slice_offset, min_distance)


def _distance_3d(prediction: Prediction, box: DukeBox) -> float:
    return distance_3d(_predicted(prediction), _lesion(box))


def _predicted(prediction: Prediction) -> Region:
    """Z is the first slice and Depth the number of slices: centred on Z + Depth / 2."""
    p = prediction
    return Region(p.x, p.y, p.width, p.height, p.z + p.depth / 2)


def _lesion(box: DukeBox) -> Region:
    return Region(box.x, box.y, box.width, box.height, box.slice)


def match(
    predictions: Sequence[Prediction],
    boxes: Sequence[DukeBox],
    min_distance: float = MIN_DISTANCE_PX,
) -> list[int | None]:
    """For each prediction, the index in `boxes` of the lesion it hits, or None."""
    by_volume: dict[tuple[str, str, str], list[int]] = {}
    for index, box in enumerate(boxes):
        by_volume.setdefault(box.volume, []).append(index)
    deepest: dict[tuple[str, str, str], int] = {}
    for p in predictions:
        deepest[p.volume] = max(deepest.get(p.volume, 0), p.z + p.depth)
    matched: list[int | None] = []
    for prediction in predictions:
        candidates = by_volume.get(prediction.volume, [])
        hits = [
            index
            for index in candidates
            if is_true_positive(
                prediction, boxes[index], _slice_offset(boxes[index], deepest), min_distance
            )
        ]
        matched.append(
            min(hits, key=lambda i: _distance_3d(prediction, boxes[i])) if hits else None
        )
    return matched


def _slice_offset(box: DukeBox, deepest: dict[tuple[str, str, str], int]) -> float:
    slices = box.volume_slices if box.volume_slices is not None else deepest.get(box.volume, 0)
    return slices / 4.0


@dataclass(frozen=True)
class Froc:
    """Sensitivities at the evaluation FP rates, and the curves they were read from."""

    lesion: dict[float, float]
    breast: dict[float, float]
    lesion_curve: tuple[list[float], list[float]]  # FPs per volume, sensitivity
    breast_curve: tuple[list[float], list[float]]
    volumes: int
    lesions: int
    breasts: int

    def summary(self) -> dict[str, object]:
        """What `cadnode-train froc` prints (JSON-ready)."""
        return {
            "volumes": self.volumes,
            "lesions": self.lesions,
            "breasts_with_lesions": self.breasts,
            "lesion_based": {_fp_key(fp): value for fp, value in self.lesion.items()},
            "breast_based": {_fp_key(fp): value for fp, value in self.breast.items()},
        }


def _fp_key(fp: float) -> str:
    return f"sensitivity_at_{fp:g}_fp_per_volume"


def froc(
    boxes: Sequence[DukeBox],
    predictions: Sequence[Prediction],
    *,
    volumes: int | None = None,
    min_distance: float = MIN_DISTANCE_PX,
    evaluation_fps: Sequence[float] = EVALUATION_FPS,
) -> Froc:
    """Lesion- and breast-based FROC; `volumes` defaults to the distinct volumes (StudyUID,
    View) named in the truth or the predictions (pass the size of the evaluated set, e.g. the
    Duke labels CSV's rows, when some volumes have neither boxes nor predictions)."""
    if not boxes:
        raise ValueError("FROC needs at least one true lesion")
    named = {(b.study_uid, b.view) for b in boxes} | {(p.study_uid, p.view) for p in predictions}
    count = volumes if volumes is not None else len(named)
    matched = match(predictions, boxes, min_distance)
    scores = np.array([p.score for p in predictions], dtype=np.float64)
    hit = np.array([m is not None for m in matched], dtype=bool)
    breast_of = [_breast(b) for b in boxes]
    breasts = sorted(set(breast_of))
    lesion_keys = [m if m is not None else -1 for m in matched]
    breast_keys = [breasts.index(breast_of[m]) if m is not None else -1 for m in matched]
    thresholds = _thresholds(scores, hit)
    lesion_curve = _curve(scores, hit, lesion_keys, thresholds, count, len(boxes), evaluation_fps)
    breast_curve = _curve(scores, hit, breast_keys, thresholds, count, len(breasts), evaluation_fps)
    return Froc(
        lesion=_read(lesion_curve, evaluation_fps),
        breast=_read(breast_curve, evaluation_fps),
        lesion_curve=lesion_curve,
        breast_curve=breast_curve,
        volumes=count,
        lesions=len(boxes),
        breasts=len(breasts),
    )


def _breast(box: DukeBox) -> tuple[str, str, str]:
    return box.patient_id, box.study_uid, box.view[:1].upper()


def _thresholds(scores: np.ndarray, hit: np.ndarray) -> list[float]:
    """Above every score, each true positive's score, below every score (Duke's choice)."""
    if not len(scores):
        return [1.0]
    return sorted(
        {float(scores.max()) + 1.0, *scores[hit].tolist(), float(scores.min()) - 1.0},
        reverse=True,
    )


def _curve(
    scores: np.ndarray,
    hit: np.ndarray,
    keys: Sequence[int],
    thresholds: Sequence[float],
    volumes: int,
    positives: int,
    evaluation_fps: Sequence[float],
) -> tuple[list[float], list[float]]:
    keys_array = np.array(keys, dtype=np.int64)
    fps: list[float] = []
    sensitivity: list[float] = []
    for threshold in thresholds:
        above = scores >= threshold
        found = len(set(keys_array[above & hit].tolist()))
        fps.append(float((above & ~hit).sum()) / max(volumes, 1))
        sensitivity.append(found / positives)
        if fps[-1] > max(evaluation_fps):
            break
    return fps, sensitivity


def _read(
    curve: tuple[list[float], list[float]], evaluation_fps: Sequence[float]
) -> dict[float, float]:
    fps, sensitivity = curve
    return {fp: float(np.interp(fp, fps, sensitivity)) for fp in evaluation_fps}
