"""cxr-segmenter: a U-Net segmenting both lung fields and pneumothorax on chest films.

Seed 001 (Zidan, "Pneumothorax Segmentation"): a cascade of a classifier and a U-Net trained
on positive films only ("One Case" model, Algorithm 1); the classifier zeroes the masks of the
films it calls normal. Here the classifier is the `cxr-ruleout` engine: this U-Net is meant to
run after it (recorded in the manifest's `cascade`), and the daemon does the zeroing at
inference. Training films all carry a pneumothorax (positives only, as the seed trains its
U-Net); lung fields are labelled on every film (seed 002 segments lungs with a U-Net too).
Loss: soft Jaccard (seed 001's JaccardLoss, MONAI DiceLoss(jaccard=True)) plus binary
cross-entropy; one-cycle learning rate (seed 001: Smith's one-cycle policy). Thresholds are
searched on validation per label (seed 001 searches 0.01..1), pneumothorax's through the
cascade when the classifier bundle is built (seed 001 reports its results after it; the
Makefile builds cxr-ruleout first), and the metrics are seed 001's: Dice per image with
empty/empty = 1, and pooled Dice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from pydantic import Field
from torch import nn
from tqdm import tqdm

from cadnode.core.yamlfile import load_model
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.bundle import (
    Bundle,
    Cascade,
    Code,
    Label,
    Manifest,
    ModelFile,
    OperatingPoint,
    Output,
    Preprocessing,
    Strict,
    TaskKind,
    sha256_of,
)
from cadnode.infer.phantoms.chest import Case, plan_cases, render_with_phantom
from cadnode.infer.preprocess import fit_square, image_to_tensor
from training.bundle import (
    CALIBRATION_FILE,
    CHEST_FILMS,
    MODEL_FILE,
    PHANTOM_CAVEAT,
    compose_card,
    interval,
    provenance,
    staged,
    write_bundle,
)
from training.checkpoint import fit
from training.export import INPUT, OUTPUT, check_against_torch, export_onnx, onnx_probabilities
from training.metrics import bootstrap_interval, dice, dice_per_image, pooled_dice
from training.plots import calibration_bins, draw_calibration
from training.ruleout import Splits, SplitTensors, make_deterministic
from training.sources import Source, phantoms_only

ANATOMY = Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
ABNORMAL_STRUCTURE = Code(
    value="49755003", scheme="SCT", meaning="Morphologically Abnormal Structure"
)
# One output channel per label, in this order. Left and right are the patient's.
LABELS = (
    Label(
        name="right_lung",
        code=Code(value="3341006", scheme="SCT", meaning="Right lung"),
        category=ANATOMY,
    ),
    Label(
        name="left_lung",
        code=Code(value="44029006", scheme="SCT", meaning="Left lung"),
        category=ANATOMY,
    ),
    Label(
        name="pneumothorax",
        code=Code(value="36118008", scheme="SCT", meaning="Pneumothorax"),
        category=ABNORMAL_STRUCTURE,
    ),
)
PNEUMOTHORAX = 2
# Searched on validation per label, over (0, 1) as seed 001 searches "between (0.01, 1)".
THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.02), 2)
CHECK_BATCH = 16


# --- configuration ---------------------------------------------------------------------------


class UNetSpec(Strict):
    channels: list[int] = Field(min_length=2, description="MONAI UNet channels per level")
    strides: list[int] = Field(min_length=1)
    residual_units: int = Field(default=1, ge=0)


class SegmenterTraining(Strict):
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=1)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)


class CascadeSpec(Strict):
    engine: str = "cxr-ruleout"
    # The built classifier bundle, to measure the cascade on the test films; skipped if absent.
    bundle: Path | None = None


class SegmenterConfig(Strict):
    """training/configs/segmenter*.yaml. The train split holds pneumothorax films only."""

    name: str = "cxr-segmenter"
    version: str = "0.1.0"
    seed: int = 0
    threads: int = Field(default=2, gt=0)
    phantom_size: int = Field(default=256, gt=31)
    input_size: int = Field(default=128, gt=15)
    evaluation_positive_fraction: float = Field(default=0.5, gt=0, lt=1)
    splits: Splits
    model: UNetSpec
    training: SegmenterTraining
    cascade: CascadeSpec = CascadeSpec()
    date: str | None = None


def load_config(path: Path) -> SegmenterConfig:
    config = load_model(path, SegmenterConfig)
    bundle = config.cascade.bundle
    if bundle is not None and not bundle.is_absolute():
        # Relative to the repository root, like the commands in the README.
        config = config.model_copy(
            update={"cascade": config.cascade.model_copy(update={"bundle": REPOSITORY / bundle})}
        )
    return config


REPOSITORY = Path(__file__).resolve().parent.parent


# --- data ------------------------------------------------------------------------------------


def positive_cases(seeds: range) -> list[Case]:
    """Seed 001 trains its U-Net on positive films only; every other one has an opacity too."""
    return [Case(seed, opacity=bool(i % 2), pneumothorax=True) for i, seed in enumerate(seeds)]


def split_cases(config: SegmenterConfig) -> dict[str, list[Case]]:
    splits = config.splits
    return {
        "train": positive_cases(splits.train.seeds),
        "validation": plan_cases(splits.validation.seeds, config.evaluation_positive_fraction),
        "test": plan_cases(splits.test.seeds, config.evaluation_positive_fraction),
    }


def tensors(
    cases: Sequence[Case], phantom_size: int, input_size: int, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, S, S) via the daemon's preprocessing and masks (N, 3, S, S) bool, the
    phantom's masks carried onto the model grid by the same fit."""
    images, masks = [], []
    for case in tqdm(cases, desc=desc, unit="film"):
        ds, phantom = render_with_phantom(case, phantom_size)
        images.append(image_to_tensor(ds, input_size, limit=DEFAULT_LIMIT)[0])
        truth = (phantom.right_lung_mask, phantom.left_lung_mask, phantom.pneumothorax_mask)
        masks.append(
            np.stack([fit_square(m.astype(np.float32), input_size)[0] >= 0.5 for m in truth])
        )
    return np.stack(images), np.stack(masks)


# --- model and training ----------------------------------------------------------------------


class Segmenter(nn.Module):
    """MONAI's UNet; `forward` returns per-label sigmoid probabilities (the exported output)."""

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        self.unet = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=len(LABELS),
            channels=spec.channels,
            strides=spec.strides,
            num_res_units=spec.residual_units,
            norm="batch",  # folds into the convolutions on export
        )

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.unet(image)
        return out

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(image))


def train(
    model: Segmenter, images: np.ndarray, masks: np.ndarray, spec: SegmenterTraining, seed: int
) -> list[float]:
    """AdamW, one-cycle schedule, soft Jaccard + BCE; flips left-right with the lungs swapped."""
    rng = np.random.default_rng(seed)
    steps = len(images) // spec.batch_size
    if steps == 0:
        raise ValueError(f"training set of {len(images)} is smaller than one batch")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.learning_rate, total_steps=spec.epochs * steps
    )
    jaccard = DiceLoss(sigmoid=True, jaccard=True)
    bce = nn.BCEWithLogitsLoss()
    x, y = torch.from_numpy(images), torch.from_numpy(masks.astype(np.float32))
    losses: list[float] = []
    model.train()
    for _ in (bar := tqdm(range(spec.epochs), desc="train", unit="epoch")):
        total = 0.0
        order = rng.permutation(len(images))
        for step in range(steps):
            index = torch.from_numpy(order[step * spec.batch_size : (step + 1) * spec.batch_size])
            batch_x, batch_y = x[index], y[index]
            if rng.random() < 0.5:  # mirror the film: the right lung becomes the left one
                batch_x = batch_x.flip(-1)
                batch_y = batch_y.flip(-1)[:, [1, 0, 2]]
            optimizer.zero_grad()
            logits = model.logits(batch_x)
            loss = jaccard(logits, batch_y) + bce(logits, batch_y)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        losses.append(total / steps)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses


# --- evaluation ------------------------------------------------------------------------------


def choose_thresholds(
    probabilities: np.ndarray, masks: np.ndarray, ruled_out: np.ndarray | None = None
) -> list[float]:
    """Per label, the threshold in THRESHOLDS with the best Dice per image (lowest on ties).

    Given the classifier's decisions (`ruled_out` per film), pneumothorax is chosen through
    seed 001's cascade, as the engine runs and as seed 001 reports its results: a ruled-out
    film's mask is empty whatever the U-Net drew, so its false positives do not push the
    threshold up."""
    chosen = []
    for label in range(len(LABELS)):
        kept = np.ones(len(probabilities), dtype=bool)
        if ruled_out is not None and label == PNEUMOTHORAX:
            kept = ~ruled_out
        scores = [
            dice_per_image(
                list((probabilities[:, label] >= t) & kept[:, None, None]), list(masks[:, label])
            )
            for t in THRESHOLDS
        ]
        chosen.append(float(THRESHOLDS[int(np.argmax(scores))]))
    return chosen


@dataclass(frozen=True)
class SegmentationEvaluation:
    thresholds: list[float]  # per label, chosen on validation
    cascaded: bool  # pneumothorax's chosen through the cascade (a classifier bundle was given)
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    calibration: list[tuple[float, float, int]]  # pneumothorax pixels, test


def measure(
    probabilities: np.ndarray,
    masks: np.ndarray,
    thresholds: Sequence[float],
    cases: Sequence[Case],
    ruled_out: np.ndarray | None,
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Dice per image and pooled Dice per label; for pneumothorax also on positive films and,
    given the classifier's decisions, through the cascade (ruled-out films' masks zeroed)."""
    predicted = probabilities >= np.asarray(thresholds, dtype=np.float32)[None, :, None, None]
    metrics: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    for index, label in enumerate(LABELS):
        per_image = np.array(
            [dice(p, t) for p, t in zip(predicted[:, index], masks[:, index], strict=True)]
        )
        metrics[f"test_dice_per_image_{label.name}"] = float(per_image.mean())
        metrics[f"test_pooled_dice_{label.name}"] = pooled_dice(
            list(predicted[:, index]), list(masks[:, index])
        )
        intervals[f"test_dice_per_image_{label.name}"] = bootstrap_interval(
            lambda i, values=per_image: float(values[i].mean()), len(per_image)
        )
    positive = np.array([case.pneumothorax for case in cases])
    pneumothorax = predicted[:, PNEUMOTHORAX]
    if positive.any():
        metrics["test_dice_per_image_pneumothorax_positive_films"] = dice_per_image(
            list(pneumothorax[positive]), list(masks[positive, PNEUMOTHORAX])
        )
    if ruled_out is not None:
        cascaded = pneumothorax & ~ruled_out[:, None, None]
        per_image = np.array(
            [dice(p, t) for p, t in zip(cascaded, masks[:, PNEUMOTHORAX], strict=True)]
        )
        metrics["test_dice_per_image_pneumothorax_cascade"] = float(per_image.mean())
        metrics["test_pooled_dice_pneumothorax_cascade"] = pooled_dice(
            list(cascaded), list(masks[:, PNEUMOTHORAX])
        )
        intervals["test_dice_per_image_pneumothorax_cascade"] = bootstrap_interval(
            lambda i: float(per_image[i].mean()), len(per_image)
        )
    return metrics, intervals


def ruled_out_by(
    bundle_path: Path | None, cases: Sequence[Case], phantom_size: int
) -> np.ndarray | None:
    """Which films the classifier bundle rules out (P < its rule_out threshold), or None."""
    if bundle_path is None or not (bundle_path / "manifest.yaml").exists():
        return None
    bundle = Bundle(bundle_path)
    size = bundle.manifest.preprocessing.size
    images = np.stack(
        [
            image_to_tensor(render_with_phantom(c, phantom_size)[0], size, limit=DEFAULT_LIMIT)[0]
            for c in cases
        ]
    )
    scores = onnx_probabilities(bundle.model_path, images, threads=2)
    return np.asarray(scores < bundle.manifest.operating_points["rule_out"].threshold)


# --- build -----------------------------------------------------------------------------------


def trained(
    config_path: Path, checkpoint: Path | None = None, source: Source | None = None
) -> tuple[SegmenterConfig, dict[str, list[Case]], SplitTensors, Segmenter]:
    """The config, its cases and tensors, and the model trained on them (or the checkpoint's)."""
    config = load_config(config_path)
    phantoms_only(source, "segmenter")
    make_deterministic(config.seed, config.threads)
    cases = split_cases(config)
    data = {
        name: tensors(c, config.phantom_size, config.input_size, name) for name, c in cases.items()
    }
    model = Segmenter(config.model)
    fit(
        model,
        lambda: train(model, *data["train"], config.training, config.seed),
        checkpoint=checkpoint,
        engine="segmenter",
        config_path=config_path,
    )
    return config, cases, data, model


def build(
    config_path: Path,
    out: Path,
    rebuild: str,
    checkpoint: Path | None = None,
    source: Source | None = None,
) -> Bundle:
    """Train on positive phantoms (or take a checkpoint's weights), export, check, choose
    thresholds, measure, write the bundle."""
    config, cases, data, model = trained(config_path, checkpoint, source)
    with staged(out) as folder:
        onnx_path = folder / MODEL_FILE
        export_onnx(model, onnx_path, config.input_size)
        difference = check_against_torch(
            model, onnx_path, data["test"][0][:CHECK_BATCH], config.threads
        )
        probabilities = {
            name: onnx_probabilities(onnx_path, data[name][0], config.threads, batch_size=16)
            for name in ("validation", "test")
        }
        ruled_out = {
            name: ruled_out_by(config.cascade.bundle, cases[name], config.phantom_size)
            for name in ("validation", "test")
        }
        thresholds = choose_thresholds(
            probabilities["validation"], data["validation"][1], ruled_out["validation"]
        )
        metrics, intervals = measure(
            probabilities["test"], data["test"][1], thresholds, cases["test"], ruled_out["test"]
        )
        evaluation = SegmentationEvaluation(
            thresholds,
            ruled_out["validation"] is not None,
            metrics,
            intervals,
            calibration_bins(
                probabilities["test"][:, PNEUMOTHORAX], data["test"][1][:, PNEUMOTHORAX]
            ),
        )
        draw_calibration(
            folder / CALIBRATION_FILE,
            [("pneumothorax pixels", evaluation.calibration)],
            "Held-out test calibration",
        )
        manifest = make_manifest(config, cases, evaluation, sha256_of(onnx_path))
        card = model_card(manifest, config, evaluation, difference, rebuild)
        write_bundle(folder, manifest, card)
    return Bundle(out)


def make_manifest(
    config: SegmenterConfig,
    cases: Mapping[str, Sequence[Case]],
    evaluation: SegmentationEvaluation,
    sha256: str,
) -> Manifest:
    return Manifest(
        name=config.name,
        version=config.version,
        task=TaskKind.segment,
        description="Chest radiograph U-Net segmenting the right and left lung fields and "
        "pneumothorax. Output: one probability map per label at the model resolution.",
        inputs=CHEST_FILMS,
        preprocessing=Preprocessing(size=config.input_size),
        labels=list(LABELS),
        operating_points={
            label.name: OperatingPoint(
                threshold=threshold,
                description=f"A pixel belongs to {label.code.meaning} when its probability is "
                "at or above this; chosen on the validation phantoms for the best Dice per image"
                + (
                    f" after the cascade (films {config.cascade.engine} rules out count as empty)."
                    if evaluation.cascaded and label.name == "pneumothorax"
                    else "."
                ),
            )
            for label, threshold in zip(LABELS, evaluation.thresholds, strict=True)
        },
        model=ModelFile(file=MODEL_FILE, sha256=sha256, input=INPUT, output=OUTPUT),
        output=Output(
            shape=["batch", "label", "row", "column"],
            description="Sigmoid probability per label (labels order) and model pixel; map it "
            "back to the film through cadnode.infer.preprocess.Geometry.",
        ),
        cascade=Cascade(
            after=config.cascade.engine,
            description="Seed 001's cascade: run only where the classifier did not rule the "
            "film out (or zero the masks of films it ruled out); trained on positive films only.",
        ),
        provenance=provenance(
            describe_data(config, cases), config.date, evaluation.metrics, evaluation.intervals
        ),
    )


def describe_data(config: SegmenterConfig, cases: Mapping[str, Sequence[Case]]) -> str:
    parts = []
    for name, split in config.splits.named().items():
        positives = sum(case.pneumothorax for case in cases[name])
        parts.append(
            f"{name}: {split.count} films, seeds {split.seeds.start}-{split.seeds.stop - 1} "
            f"({positives} with pneumothorax)."
        )
    return (
        "Synthetic chest radiograph phantoms (cadnode/infer/phantoms/chest.py, "
        f"{config.phantom_size}x{config.phantom_size} px DX) preprocessed by "
        "cadnode.infer.preprocess.image_to_tensor to "
        f"{config.input_size} px; masks from the phantom "
        "generator. Training films all have a pneumothorax (seed 001: U-Net on positives only). "
        + " ".join(parts)
    )


def model_card(
    manifest: Manifest,
    config: SegmenterConfig,
    evaluation: SegmentationEvaluation,
    export_difference: float,
    rebuild: str,
) -> str:
    rows = "\n".join(
        f"| {label.name} ({label.code.value}) | {threshold:.2f} | "
        f"{evaluation.metrics[f'test_dice_per_image_{label.name}']:.4f} "
        f"{interval(evaluation.intervals[f'test_dice_per_image_{label.name}'])} | "
        f"{evaluation.metrics[f'test_pooled_dice_{label.name}']:.4f} |"
        for label, threshold in zip(LABELS, evaluation.thresholds, strict=True)
    )
    cascade = (
        "Through the cascade (films the `cxr-ruleout` bundle rules out get an empty "
        "pneumothorax mask): Dice per image "
        f"{evaluation.metrics['test_dice_per_image_pneumothorax_cascade']:.4f} "
        f"{interval(evaluation.intervals['test_dice_per_image_pneumothorax_cascade'])}, pooled "
        f"{evaluation.metrics['test_pooled_dice_pneumothorax_cascade']:.4f}."
        if "test_dice_per_image_pneumothorax_cascade" in evaluation.metrics
        else "The cascade was not measured (no classifier bundle was given)."
    )
    positive = evaluation.metrics.get(
        "test_dice_per_image_pneumothorax_positive_films", float("nan")
    )
    sections = [
        "## What it does\n\n" + manifest.description + " Inputs: CR/DX chest films, PA or AP, "
        "preprocessed by `cadnode.infer.preprocess.image_to_tensor` to "
        f"{config.input_size} px. The "
        f"ONNX graph takes `image` (N, 1, {config.input_size}, {config.input_size}) and returns "
        f"`probability` (N, 3, {config.input_size}, {config.input_size}): right lung, left lung "
        "(the patient's), pneumothorax. It is meant to run after `cxr-ruleout` (seed 001's "
        "cascade): the daemon zeroes the masks of films the classifier rules out.",
        "## Data\n\n" + manifest.provenance.training_data + "\n\n" + PHANTOM_CAVEAT,
        "## Model and training\n\nMONAI `UNet` (channels "
        f"{config.model.channels}, strides {config.model.strides}, "
        f"{config.model.residual_units} residual unit(s), batch norm), trained with soft "
        "Jaccard + binary cross-entropy (seed 001 used a Jaccard loss), AdamW and a one-cycle "
        "schedule, random left-right mirroring with the lung labels swapped. Deterministic "
        f"(fixed seeds, deterministic algorithms, {config.threads} threads).",
        "## Held-out test metrics\n\nSeed 001's metrics on the test phantoms (half of them "
        "normal), computed with ONNX Runtime on the shipped model at the thresholds chosen on "
        "validation ("
        + (
            "pneumothorax's through the cascade, seed 001's order: films the classifier rules "
            "out count with an empty mask"
            if evaluation.cascaded
            else "no classifier bundle was given: pneumothorax's on all films, not through the "
            "cascade"
        )
        + "): Dice per image (1 when prediction and truth are both empty; 95 % bootstrap "
        "interval in brackets) and pooled Dice (all pixels of all films at once).\n\n"
        "| label | threshold | Dice per image | pooled Dice |\n|---|---|---|---|\n"
        + rows
        + f"\n\nPneumothorax Dice per image on the films that have one: {positive:.4f}. "
        + cascade
        + f"\n\n![Calibration of the pneumothorax probabilities]({CALIBRATION_FILE})",
    ]
    return compose_card(
        manifest, sections, export_difference=export_difference, rebuild=rebuild, config=config
    )
