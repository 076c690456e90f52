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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from PIL import Image
from pydantic import Field
from torch import nn

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
from cadnode.infer.phantoms.difficulty import EASY, Difficulty, DifficultySetting
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
from training.datasets import rle_decode
from training.export import INPUT, OUTPUT, check_against_torch, export_onnx, onnx_probabilities
from training.metrics import bootstrap_interval
from training.plots import draw_calibration
from training.records import Record, chest_case, chest_records
from training.ruleout import Splits
from training.sources import ChestFilm, Source, folder_splits, resolved
from training.streaming import (
    EpochBatches,
    Schedule,
    film_tensor,
    in_order,
    loader,
    seed_everything,
)
from training.streaming import fit as fit_streaming

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
UNLABELLED_THRESHOLD = 0.5  # a label the data never draw (Montgomery's pneumothorax)
CHECK_BATCH = 16
EVALUATION_BATCH = 16


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
    # cadnode.infer.phantoms.difficulty: a preset's name or its fields; absent, easy.
    difficulty: DifficultySetting = EASY
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


def fitted(mask: np.ndarray, size: int) -> np.ndarray:
    """A source-pixel mask carried onto the model grid by the images' own fit."""
    return fit_square(mask.astype(np.float32), size)[0] >= 0.5


@dataclass(frozen=True)
class SegmentedFilm:
    """A chest record as (image (1, S, S), masks (3, S, S) in LABELS order, labelled (3,)):
    `labelled` says which labels the record's dataset draws (SIIM: pneumothorax only;
    Montgomery and Shenzhen: the lungs only; phantoms: all three); the loss and the metrics
    count only those. With `augment`, mirrored half the time, the lungs swapped with it."""

    size: int
    phantom_size: int
    augment: bool = False
    difficulty: Difficulty = EASY  # of a phantom record's film

    def read(self, record: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        empty = np.zeros((self.size, self.size), dtype=bool)
        if record.image is None:
            ds, phantom = render_with_phantom(
                chest_case(record), self.phantom_size, self.difficulty
            )
            image = image_to_tensor(ds, self.size, limit=DEFAULT_LIMIT)[0]
            truth = (phantom.right_lung_mask, phantom.left_lung_mask, phantom.pneumothorax_mask)
            return image, np.stack([fitted(m, self.size) for m in truth]), np.ones(3, bool)
        if record.rle:  # SIIM-ACR: the RLE is drawn on the DICOM film's own grid
            ds = pydicom.dcmread(record.image)
            rows, columns = int(ds.Rows), int(ds.Columns)
            region = np.logical_or.reduce([rle_decode(c, rows, columns) for c in record.rle])
            image = image_to_tensor(ds, self.size, limit=DEFAULT_LIMIT)[0]
            masks = np.stack([empty, empty, fitted(region, self.size)])
            return image, masks, np.array([False, False, True])
        if record.masks:  # Montgomery (left, right) or Shenzhen (both lungs)
            lungs = [mask_png(path) for path in record.masks]
            right, left = (lungs[1], lungs[0]) if len(lungs) == 2 else split_lungs(lungs[0])
            masks = np.stack([fitted(right, self.size), fitted(left, self.size), empty])
            image = film_tensor(record.image, self.size)
            return image, masks, np.array([True, True, False])
        raise ValueError(f"{record.key}: no segmentation masks (siim, montgomery or shenzhen)")

    def __call__(self, record: Record, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        image, masks, labelled = self.read(record)
        if self.augment and rng.random() < 0.5:  # the right lung becomes the left one
            image, masks = image[:, :, ::-1], masks[[1, 0, 2], :, ::-1]
            labelled = labelled[[1, 0, 2]]
        return (
            np.ascontiguousarray(image),
            np.ascontiguousarray(masks, dtype=np.float32),
            labelled.astype(np.float32),
        )


def mask_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 0


def split_lungs(both: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) of a both-lungs mask (Shenzhen): the patient's right lung is on the image's
    left, and the mediastinum between them crosses the film's middle column."""
    middle = both.shape[1] // 2
    right, left = both.copy(), both.copy()
    right[:, middle:] = False
    left[:, :middle] = False
    return right, left


def tensors(
    cases: Sequence[Case],
    phantom_size: int,
    input_size: int,
    desc: str = "",
    difficulty: Difficulty = EASY,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, S, S) via the daemon's preprocessing and masks (N, 3, S, S) bool of
    phantom cases, read as training reads them (`SegmentedFilm`), all at once."""
    sample = SegmentedFilm(input_size, phantom_size, difficulty=difficulty)
    read = [sample.read(record) for record in chest_records(cases)]
    return np.stack([r[0] for r in read]), np.stack([r[1] for r in read])


def films_of(config: SegmenterConfig) -> SegmentedFilm:
    return SegmentedFilm(config.input_size, config.phantom_size, difficulty=config.difficulty)


def segmenter_splits(
    config: SegmenterConfig, source: Source
) -> tuple[dict[str, list[Record]], str | None]:
    """Phantoms (train: positives only) or a folder's films by patient; of a folder's train
    split seed 001's positives only where pneumothorax is labelled (SIIM), every film where
    only the lungs are (Montgomery, Shenzhen)."""
    if source.data is None:
        return {name: chest_records(cases) for name, cases in split_cases(config).items()}, None
    splits, description = folder_splits(source, config.seed)
    train = [r for r in splits["train"] if r.labels.get("pneumothorax", 1.0) > 0.5]
    if not train:
        raise ValueError(f"{source.data}: no training film has a pneumothorax")
    return {**splits, "train": train}, description


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


JACCARD = DiceLoss(sigmoid=True, jaccard=True, reduction="none")


def segmentation_loss(
    logits: torch.Tensor, masks: torch.Tensor, labelled: torch.Tensor
) -> torch.Tensor:
    """Soft Jaccard + binary cross-entropy per film and label, averaged over the labels each
    film's dataset draws (`labelled` (N, 3) 0/1): an unlabelled channel teaches nothing."""
    jaccard = JACCARD(logits, masks).flatten(1)
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean(dim=(2, 3))
    weight = labelled.float()
    loss: torch.Tensor = ((jaccard + bce) * weight).sum() / weight.sum().clamp(min=1.0)
    return loss


def shuffled_batches(count: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(count)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(count // batch_size)]


def train(
    model: Segmenter,
    splits: Mapping[str, Sequence[Record]],
    config: SegmenterConfig,
    source: Source,
) -> None:
    """Streamed: AdamW, one-cycle schedule, `segmentation_loss`, films mirrored at random with
    the lungs swapped; for a folder (or with --patience) the validation Dice per image (at
    each label's best threshold) per epoch keeps the best weights and stops early."""
    spec, count = config.training, len(splits["train"])
    steps = count // spec.batch_size
    if steps == 0:
        raise ValueError(f"training set of {count} films is smaller than one batch")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    schedule = Schedule(
        optimizer,
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=spec.learning_rate, total_steps=spec.epochs * steps
        ),
    )
    sampler = EpochBatches(lambda rng: shuffled_batches(count, spec.batch_size, rng), config.seed)
    plain = films_of(config)
    sample = replace(plain, augment=True)

    def step(net: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        assert isinstance(net, Segmenter)
        return segmentation_loss(net.logits(batch[0]), batch[1], batch[2])

    def validate(net: nn.Module) -> float:
        overlaps = overlaps_of(torch_probabilities(net), splits["validation"], plain, source)
        return overlaps.best_dice()

    fit_streaming(
        model,
        step=step,
        train=loader(splits["train"], sample, sampler, source.run.workers),
        sampler=sampler,
        schedule=schedule,
        epochs=spec.epochs,
        validate=validate if source.data is not None or source.run.patience else None,
        metric="validation_dice_per_image",
        options=source.run,
    )


# --- evaluation ------------------------------------------------------------------------------

Probabilities = Callable[[np.ndarray], np.ndarray]  # images (N, 1, S, S) -> (N, 3, S, S)
CALIBRATION_BINS = 10


def torch_probabilities(model: nn.Module) -> Probabilities:
    device = next(model.parameters()).device

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = model(torch.from_numpy(images).to(device)).float().cpu().numpy()
        return out

    return run


@dataclass
class Overlaps:
    """What Dice needs of every film, label and threshold in THRESHOLDS, counted a batch at a
    time so that evaluation holds counts, not maps: |predicted & truth| and |predicted|
    (N, 3, T), |truth| and whether the film's dataset labels it (N, 3); and the pneumothorax
    pixels' calibration tallies (per bin: count, summed probability, positives)."""

    intersection: np.ndarray
    predicted: np.ndarray
    truth: np.ndarray
    labelled: np.ndarray
    tallies: np.ndarray  # (3, CALIBRATION_BINS)

    @classmethod
    def of(
        cls, probabilities: np.ndarray, masks: np.ndarray, labelled: np.ndarray | None = None
    ) -> Overlaps:
        truth = masks > 0.5
        called = probabilities[:, :, None] >= THRESHOLDS[None, None, :, None, None]
        present = np.ones(masks.shape[:2], bool) if labelled is None else labelled > 0.5
        shown = present[:, PNEUMOTHORAX]
        p = probabilities[shown, PNEUMOTHORAX].reshape(-1).astype(np.float64)
        y = truth[shown, PNEUMOTHORAX].reshape(-1)
        index = np.minimum((p * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
        tallies = np.stack(
            [
                np.bincount(index, minlength=CALIBRATION_BINS),
                np.bincount(index, weights=p, minlength=CALIBRATION_BINS),
                np.bincount(index, weights=y, minlength=CALIBRATION_BINS),
            ]
        )
        return cls(
            (called & truth[:, :, None]).sum(axis=(3, 4)),
            called.sum(axis=(3, 4)),
            truth.sum(axis=(2, 3)),
            present,
            tallies,
        )

    @classmethod
    def joined(cls, parts: Sequence[Overlaps]) -> Overlaps:
        return cls(
            intersection=np.concatenate([p.intersection for p in parts]),
            predicted=np.concatenate([p.predicted for p in parts]),
            truth=np.concatenate([p.truth for p in parts]),
            labelled=np.concatenate([p.labelled for p in parts]),
            tallies=np.sum([p.tallies for p in parts], axis=0),
        )

    def dice(self, label: int, kept: np.ndarray | None = None) -> np.ndarray:
        """(films labelled with `label`, T): Dice per image at every threshold, 1 when both are
        empty; films not `kept` (ruled out by the cascade) count with an empty prediction."""
        present = self.labelled[:, label]
        keep = np.ones(len(present), bool) if kept is None else kept
        both = self.intersection[present, label] * keep[present, None]
        called = self.predicted[present, label] * keep[present, None]
        total = called + self.truth[present, label][:, None]
        return np.where(total == 0, 1.0, 2.0 * both / np.maximum(total, 1))

    def pooled(self, label: int, threshold: int, kept: np.ndarray | None = None) -> float:
        present = self.labelled[:, label]
        keep = np.ones(len(present), bool) if kept is None else kept
        both = float((self.intersection[present, label, threshold] * keep[present]).sum())
        total = float((self.predicted[present, label, threshold] * keep[present]).sum())
        total += float(self.truth[present, label].sum())
        return 1.0 if total == 0 else 2.0 * both / total

    def labels(self) -> list[int]:
        return [label for label in range(len(LABELS)) if self.labelled[:, label].any()]

    def best_dice(self) -> float:
        """Mean over the labelled labels of the best Dice per image over THRESHOLDS."""
        return float(np.mean([self.dice(label).mean(axis=0).max() for label in self.labels()]))

    def calibration(self) -> list[tuple[float, float, int]]:
        count, summed, positives = self.tallies
        return [
            (float(summed[b] / count[b]), float(positives[b] / count[b]), int(count[b]))
            for b in range(CALIBRATION_BINS)
            if count[b]
        ]


def overlaps_of(
    run: Probabilities, records: Sequence[Record], sample: SegmentedFilm, source: Source
) -> Overlaps:
    batches = loader(records, sample, in_order(len(records), EVALUATION_BATCH), source.run.workers)
    return Overlaps.joined(
        [
            Overlaps.of(run(images.numpy()), masks.numpy(), labelled.numpy())
            for images, masks, labelled in batches
        ]
    )


def choose_thresholds(
    probabilities: np.ndarray, masks: np.ndarray, ruled_out: np.ndarray | None = None
) -> list[float]:
    """`chosen_thresholds` of maps held in memory (every label labelled on every film)."""
    return chosen_thresholds(Overlaps.of(probabilities, masks), ruled_out)


def chosen_thresholds(overlaps: Overlaps, ruled_out: np.ndarray | None = None) -> list[float]:
    """Per label, the threshold in THRESHOLDS with the best Dice per image (lowest on ties);
    UNLABELLED_THRESHOLD for a label no validation film is labelled with.

    Given the classifier's decisions (`ruled_out` per film), pneumothorax is chosen through
    seed 001's cascade, as the engine runs and as seed 001 reports its results: a ruled-out
    film's mask is empty whatever the U-Net drew, so its false positives do not push the
    threshold up."""
    chosen = []
    for label in range(len(LABELS)):
        if not overlaps.labelled[:, label].any():
            chosen.append(UNLABELLED_THRESHOLD)
            continue
        kept = None if ruled_out is None or label != PNEUMOTHORAX else ~ruled_out
        scores = overlaps.dice(label, kept).mean(axis=0)
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
    overlaps: Overlaps, thresholds: Sequence[float], ruled_out: np.ndarray | None
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Dice per image and pooled Dice per labelled label; for pneumothorax also on positive
    films and, given the classifier's decisions, through the cascade (ruled-out films'
    masks zeroed)."""
    metrics: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}

    def record(name: str, label: int, kept: np.ndarray | None) -> None:
        at = int(np.argmin(np.abs(THRESHOLDS - thresholds[label])))
        per_image = overlaps.dice(label, kept)[:, at]
        metrics[f"test_dice_per_image_{name}"] = float(per_image.mean())
        metrics[f"test_pooled_dice_{name}"] = overlaps.pooled(label, at, kept)
        intervals[f"test_dice_per_image_{name}"] = bootstrap_interval(
            lambda i: float(per_image[i].mean()), len(per_image)
        )

    labelled = overlaps.labels()
    for label in labelled:
        record(LABELS[label].name, label, None)
    if PNEUMOTHORAX in labelled:
        at = int(np.argmin(np.abs(THRESHOLDS - thresholds[PNEUMOTHORAX])))
        positive = overlaps.truth[overlaps.labelled[:, PNEUMOTHORAX], PNEUMOTHORAX] > 0
        if positive.any():
            per_image = overlaps.dice(PNEUMOTHORAX)[:, at]
            metrics["test_dice_per_image_pneumothorax_positive_films"] = float(
                per_image[positive].mean()
            )
        if ruled_out is not None:
            record("pneumothorax_cascade", PNEUMOTHORAX, ~ruled_out)
    return metrics, intervals


def ruled_out_by(
    bundle_path: Path | None,
    cases: Sequence[Case],
    phantom_size: int,
    difficulty: Difficulty = EASY,
) -> np.ndarray | None:
    """`ruled_out_of` planned phantom cases."""
    films = SegmentedFilm(phantom_size, phantom_size, difficulty=difficulty)
    return ruled_out_of(bundle_path, chest_records(cases), films, workers=0)


def ruled_out_of(
    bundle_path: Path | None, records: Sequence[Record], films: SegmentedFilm, workers: int
) -> np.ndarray | None:
    """Which films the classifier bundle rules out (P < its rule_out threshold), or None
    when no bundle is given; the films (phantoms drawn as `films` draws them) streamed
    through the classifier's own input size."""
    if bundle_path is None or not (bundle_path / "manifest.yaml").exists():
        return None
    bundle = Bundle(bundle_path)
    size = bundle.manifest.preprocessing.size
    sample = ChestFilm(size, films.phantom_size, difficulty=films.difficulty)
    batches = loader(records, sample, in_order(len(records), EVALUATION_BATCH), workers)
    scores = np.concatenate(
        [onnx_probabilities(bundle.model_path, images.numpy(), threads=2) for images, _ in batches]
    )
    return np.asarray(scores < bundle.manifest.operating_points["rule_out"].threshold)


# --- build -----------------------------------------------------------------------------------


def trained(
    config_path: Path, checkpoint: Path | None = None, source: Source | None = None
) -> tuple[SegmenterConfig, dict[str, list[Record]], str | None, Segmenter]:
    """The config, its splits (records) and a folder's description, and the model trained on
    them (or the checkpoint's)."""
    config = load_config(config_path)
    source = resolved(source or Source(), "segmenter")
    seed_everything(config.seed, config.threads)
    splits, description = segmenter_splits(config, source)
    model = Segmenter(config.model)
    fit(
        model,
        lambda: train(model, splits, config, source),
        checkpoint=checkpoint,
        engine="segmenter",
        config_path=config_path,
    )
    return config, splits, description, model


def build(
    config_path: Path,
    out: Path,
    rebuild: str,
    checkpoint: Path | None = None,
    source: Source | None = None,
) -> Bundle:
    """Train (or take a checkpoint's weights), export, check, choose thresholds on validation
    (pneumothorax's through the cascade), measure on test, write the bundle. Thresholds and
    figures come from ONNX Runtime on the exported file, streamed a batch at a time."""
    config, splits, description, model = trained(config_path, checkpoint, source)
    source = source or Source()
    sample = films_of(config)
    rng = np.random.default_rng(0)
    with staged(out) as folder:
        onnx_path = folder / MODEL_FILE
        export_onnx(model, onnx_path, config.input_size)
        check = np.stack([sample(r, rng)[0] for r in splits["test"][:CHECK_BATCH]])
        difference = check_against_torch(model, onnx_path, check, config.threads)
        run: Probabilities = lambda images: onnx_probabilities(  # noqa: E731
            onnx_path, images, config.threads, batch_size=16
        )
        overlaps = {
            name: overlaps_of(run, splits[name], sample, source) for name in ("validation", "test")
        }
        ruled_out = {
            name: ruled_out_of(config.cascade.bundle, splits[name], sample, source.run.workers)
            for name in ("validation", "test")
        }
        thresholds = chosen_thresholds(overlaps["validation"], ruled_out["validation"])
        metrics, intervals = measure(overlaps["test"], thresholds, ruled_out["test"])
        evaluation = SegmentationEvaluation(
            thresholds,
            ruled_out["validation"] is not None,
            metrics,
            intervals,
            overlaps["test"].calibration(),
        )
        draw_calibration(
            folder / CALIBRATION_FILE,
            [("pneumothorax pixels", evaluation.calibration)],
            "Held-out test calibration",
        )
        data = description or describe_data(config, splits)
        manifest = make_manifest(config, data, evaluation, sha256_of(onnx_path))
        card = model_card(manifest, config, evaluation, difference, rebuild)
        write_bundle(folder, manifest, card)
    return Bundle(out)


def make_manifest(
    config: SegmenterConfig,
    training_data: str,
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
                + (
                    "at or above this; chosen on the validation films for the best Dice per image"
                    + (
                        f" after the cascade (films {config.cascade.engine} rules out count as "
                        "empty)."
                        if evaluation.cascaded and label.name == "pneumothorax"
                        else "."
                    )
                    if labelled(evaluation, label)
                    else "at or above this default: the training data do not label it (the "
                    "model never learnt it)."
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
        provenance=provenance(training_data, config.date, evaluation.metrics, evaluation.intervals),
    )


def describe_data(config: SegmenterConfig, splits: Mapping[str, Sequence[Record]]) -> str:
    parts = []
    for name, split in config.splits.named().items():
        positives = sum(record.labels["pneumothorax"] > 0.5 for record in splits[name])
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


def labelled(evaluation: SegmentationEvaluation, label: Label) -> bool:
    return f"test_dice_per_image_{label.name}" in evaluation.metrics


def model_card(
    manifest: Manifest,
    config: SegmenterConfig,
    evaluation: SegmentationEvaluation,
    export_difference: float,
    rebuild: str,
) -> str:
    rows = "\n".join(
        f"| {label.name} ({label.code.value}) | {threshold:.2f} | "
        + (
            f"{evaluation.metrics[f'test_dice_per_image_{label.name}']:.4f} "
            f"{interval(evaluation.intervals[f'test_dice_per_image_{label.name}'])} | "
            f"{evaluation.metrics[f'test_pooled_dice_{label.name}']:.4f} |"
            if labelled(evaluation, label)
            else "not labelled in this data | - |"
        )
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
        "## Held-out test metrics\n\nSeed 001's metrics on the held-out test films (of the "
        "phantoms, half normal), computed with ONNX Runtime on the shipped model at the "
        "thresholds chosen on validation ("
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
