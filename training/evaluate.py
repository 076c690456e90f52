"""A built bundle measured on a fresh phantom set (`cadnode-train evaluate`).

Everything goes through what the daemon would run: the bundle's `model.onnx` under ONNX
Runtime, its manifest's preprocessing size and operating points. The figures are named like
the ones the build wrote into the manifest, so a card's claims can be checked against a new
sample (tests/test_training_engines.py does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.bundle import Bundle
from cadnode.infer.phantoms.breast import plan_volumes
from cadnode.infer.phantoms.chest import plan_cases, render
from cadnode.infer.preprocess import image_to_tensor
from training import detector, ruleout, segmenter
from training.export import onnx_probabilities
from training.froc import froc
from training.metrics import auc, dice_per_image, pooled_dice
from training.ruleout import rates

CONFIGS = Path(__file__).resolve().parent / "configs"


def evaluate_ruleout(
    bundle: Bundle, seeds: range, config: Path = CONFIGS / "ruleout.yaml"
) -> dict[str, float]:
    """AUC and sensitivity/specificity at each operating point on balanced fresh films, drawn
    at the config's phantom size and difficulty."""
    settings = ruleout.load_config(config)
    cases = plan_cases(seeds, 0.5)
    size = bundle.manifest.preprocessing.size
    images = np.stack(
        [
            image_to_tensor(
                render(case, settings.phantom_size, settings.difficulty), size, limit=DEFAULT_LIMIT
            )[0]
            for case in cases
        ]
    )
    scores = onnx_probabilities(bundle.model_path, images, threads=2)
    labels = np.array([case.abnormal for case in cases], dtype=np.float32)
    figures = {"test_auc": auc(scores, labels)}
    for name, point in bundle.manifest.operating_points.items():
        measured = rates(scores, labels, point.threshold)
        figures[f"test_sensitivity_at_{name}"] = measured.sensitivity
        figures[f"test_specificity_at_{name}"] = measured.specificity
    return figures


def evaluate_segmenter(
    bundle: Bundle, seeds: range, config: Path = CONFIGS / "segmenter.yaml"
) -> dict[str, float]:
    """Dice per image and pooled Dice per label at the manifest's thresholds (half the films
    have a pneumothorax)."""
    settings = segmenter.load_config(config)
    cases = plan_cases(seeds, settings.evaluation_positive_fraction)
    size = bundle.manifest.preprocessing.size
    images, masks = segmenter.tensors(
        cases, settings.phantom_size, size, "films", settings.difficulty
    )
    probabilities = onnx_probabilities(bundle.model_path, images, threads=2, batch_size=16)
    figures = {}
    for index, label in enumerate(segmenter.LABELS):
        threshold = bundle.manifest.operating_points[label.name].threshold
        predicted = list(probabilities[:, index] >= threshold)
        truth = list(masks[:, index])
        figures[f"test_dice_per_image_{label.name}"] = dice_per_image(predicted, truth)
        figures[f"test_pooled_dice_{label.name}"] = pooled_dice(predicted, truth)
    return figures


def evaluate_detector(
    bundle: Bundle, seeds: range, config: Path = CONFIGS / "dbt.yaml"
) -> dict[str, float]:
    """Lesion- and breast-based FROC sensitivities with the config's Duke distance."""
    settings = detector.load_config(config)
    cases = plan_volumes(seeds, settings.positive_fraction)
    truth, predictions = detector.predict_set(bundle.model_path, cases, settings, "volumes")
    result = froc(truth, predictions, volumes=len(cases), min_distance=settings.min_distance_px)
    figures = {}
    for kind, values in (("lesion", result.lesion), ("breast", result.breast)):
        for fp, value in values.items():
            figures[f"test_{kind}_sensitivity_at_{fp:g}_fp".replace(".", "_")] = value
    return figures


EVALUATORS = {
    "ruleout": evaluate_ruleout,
    "segmenter": evaluate_segmenter,
    "dbt": evaluate_detector,
}
