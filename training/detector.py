"""dbt-detector: seed 003 A.8's single-stage grid detector on DBT slices (Buda et al., the Duke
BCS-DBT baseline).

- One 2D slice at a time, a fully convolutional DenseNet-style network (dense blocks and
  transitions; Duke: DenseNet backbone, 2x max-pool, 4 dense transitions, a stride-3 conv, 96 px
  cells) down to a grid of `cell` px cells; each cell gives an objectness and one box (centre
  offset in the cell, size relative to an `anchor`, Duke: 256 px). Scaled down here: 16 px
  cells on 128 px slices, which is what the small phantom volumes need.
- Training: positive slices sampled per lesion, round(sqrt(mean box side in px)) slices
  around its central slice (Duke's rule), each carrying the lesion's box; negatives from
  normal volumes; every batch half positive (seed 000's batch control). Adam, focal loss on
  objectness (Duke's grid search: focal was best on validation, 60 % at 2 FP/volume), MSE on
  the boxes, Kaiming initialisation, objectness bias set to a prior (Duke: 1/77).
- Inference: every slice through the model, boxes above a floor score, fused across slices
  with weighted box fusion (ensemble-boxes, seed 002; in place of Duke's NMS), boxes whose
  centre falls outside the breast dropped (Duke drops boxes mostly outside it). Each fused box
  becomes a Duke prediction row (Z = first slice it was seen on, Depth = slices spanned).
- Evaluation: FROC with the Duke true-positive rule (training.froc).

The exported graph decodes its grid itself: output `boxes` (N, cells, 5) = score, x, y,
width, height in model-input pixels, so the daemon needs no knowledge of cells or anchors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
import torch
from monai.losses import FocalLoss
from pydantic import Field
from pydicom import Dataset
from pydicom.uid import BreastTomosynthesisImageStorage
from torch import nn
from tqdm import tqdm

from cadnode.core.yamlfile import load_model
from cadnode.infer.bundle import (
    Bundle,
    Code,
    Inputs,
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
from cadnode.infer.phantoms.breast import VolumeCase, plan_volumes, render_volume
from cadnode.infer.phantoms.difficulty import EASY, Difficulty, DifficultySetting
from cadnode.infer.postprocess import Fusion, fuse_slices, source_box
from cadnode.infer.preprocess import Geometry
from training.bundle import (
    FROC_FILE,
    MODEL_FILE,
    PHANTOM_CAVEAT,
    compose_card,
    interval,
    provenance,
    staged,
    write_bundle,
)
from training.checkpoint import fit
from training.datasets import DukeBox, VolumeKey, duke_volume_tensor
from training.export import INPUT, check_against_torch, export_onnx, onnx_probabilities
from training.froc import EVALUATION_FPS, MIN_DISTANCE_PX, Froc, Prediction, froc
from training.metrics import bootstrap_interval, proportion_interval
from training.plots import draw_froc
from training.records import Record, volume_key, volume_records
from training.ruleout import Splits, controlled_batches
from training.sources import Source, folder_splits, resolved
from training.streaming import (
    EpochBatches,
    Schedule,
    alone,
    concatenated,
    in_order,
    loader,
    seed_everything,
)
from training.streaming import fit as fit_streaming

OUTPUT = "boxes"
FIELDS = ["score", "x", "y", "width", "height"]
MASS = Label(
    name="mass",
    code=Code(value="129788004", scheme="SCT", meaning="Mammographic breast mass"),
    category=Code(value="49755003", scheme="SCT", meaning="Morphologically Abnormal Structure"),
)
CHECK_BATCH = 16
# Boxes pass through exp(): float32 rounding in the folded convolutions grows with the box, so
# coordinates are checked to 1e-3 of their value (0.1 px at 100 px), scores to 1e-3.
EXPORT_TOLERANCE = 1e-3
Item = TypeVar("Item", DukeBox, Prediction)


# --- configuration ---------------------------------------------------------------------------


class DetectorSpec(Strict):
    stem: int = Field(default=16, gt=0, description="Channels of the stem convolution")
    growth: int = Field(default=8, gt=0, description="Channels each dense layer adds")
    blocks: list[int] = Field(min_length=1, description="Dense layers per block")
    anchor: float = Field(default=20.0, gt=0, description="Box size at zero log-scale, px")
    objectness_prior: float = Field(default=1 / 64, gt=0, lt=1)

    @property
    def cell(self) -> int:
        """Model pixels per grid cell: the stem's stride 2 and max-pool, /2 per transition."""
        return 2 ** (len(self.blocks) + 1)


class DetectorTraining(Strict):
    epochs: int = Field(gt=0)
    # Volumes per batch, each giving its slab of slices (its lesions' slices, or
    # negatives_per_volume slices of a normal volume): a batch reads `batch_size` volumes.
    batch_size: int = Field(gt=1)
    learning_rate: float = Field(gt=0)
    batch_positive_fraction: float = Field(default=0.5, gt=0, lt=1)
    box_weight: float = Field(default=5.0, ge=0)
    negatives_per_volume: int = Field(default=4, gt=0, description="Slices of a normal volume")
    # Duke's model selection: stop after this many epochs without a better validation FROC
    # (their baseline: 25); `--patience` overrides it. None: run every epoch.
    patience: int | None = Field(default=None, gt=0)


class DetectorInference(Strict):
    min_score: float = Field(default=0.05, ge=0, lt=1)
    fusion_iou: float = Field(default=0.3, gt=0, lt=1)
    breast_level: float = Field(default=0.1, ge=0, lt=1, description="Windowed value, 0..1")
    report_fp_per_volume: float = Field(default=1.0, gt=0)


class DetectorConfig(Strict):
    """training/configs/dbt*.yaml."""

    name: str = "dbt-detector"
    version: str = "0.1.0"
    seed: int = 0
    threads: int = Field(default=2, gt=0)
    slices: int = Field(default=16, gt=3)
    phantom_size: int = Field(default=128, gt=31)
    input_size: int = Field(default=128, gt=15)
    positive_fraction: float = Field(default=0.5, gt=0, lt=1, description="Volumes with masses")
    # cadnode.infer.phantoms.difficulty: a preset's name or its fields; absent, easy.
    difficulty: DifficultySetting = EASY
    # The Duke rule's 100 px are ~10 mm at their ~0.1 mm pixels; the phantoms' pixels are
    # 0.5 mm, so 20 px is the same distance. The card also reports the literal 100 px.
    min_distance_px: float = Field(default=20.0, gt=0)
    splits: Splits
    model: DetectorSpec
    training: DetectorTraining
    inference: DetectorInference = DetectorInference()
    date: str | None = None


def load_config(path: Path) -> DetectorConfig:
    return load_model(path, DetectorConfig)


# --- model -----------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def transition(channels: int) -> nn.Module:
    """DenseNet's transition: BN-ReLU-1x1 conv halving the channels, 2x2 average pool."""
    return nn.Sequential(
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels // 2, 1, bias=False),
        nn.AvgPool2d(2),
    )


class GridDetector(nn.Module):
    """Dense blocks to a grid of cells; `raw` gives (N, 5, G, G), `forward` decoded boxes."""

    def __init__(self, spec: DetectorSpec, input_size: int) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = [
            nn.Conv2d(1, spec.stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(spec.stem),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = spec.stem
        for index, count in enumerate(spec.blocks):
            for _ in range(count):
                layers.append(DenseLayer(channels, spec.growth))
                channels += spec.growth
            if index < len(spec.blocks) - 1:
                layers.append(transition(channels))
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 5, 1)
        self._initialise()
        grid = input_size // spec.cell
        rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        self.register_buffer("cell_x", columns.reshape(1, -1).float(), persistent=False)
        self.register_buffer("cell_y", rows.reshape(1, -1).float(), persistent=False)

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        assert self.head.bias is not None
        nn.init.zeros_(self.head.bias)
        prior = self.spec.objectness_prior
        nn.init.constant_(self.head.bias[:1], math.log(prior / (1 - prior)))

    def raw(self, image: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(image))
        return out

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        raw = self.raw(image).flatten(2)  # (N, 5, cells)
        cell, anchor = float(self.spec.cell), self.spec.anchor
        score = torch.sigmoid(raw[:, 0])
        centre_x = (self.cell_x + torch.sigmoid(raw[:, 1])) * cell
        centre_y = (self.cell_y + torch.sigmoid(raw[:, 2])) * cell
        width = anchor * torch.exp(raw[:, 3].clamp(max=6.0))
        height = anchor * torch.exp(raw[:, 4].clamp(max=6.0))
        boxes = [score, centre_x - width / 2, centre_y - height / 2, width, height]
        return torch.stack(boxes, dim=2)


# --- data ------------------------------------------------------------------------------------


@dataclass
class Slices:
    """Training slices: images (M, 1, S, S), grid targets (M, 5, G, G), positive flags (M,)."""

    images: np.ndarray
    targets: np.ndarray
    positive: np.ndarray


def model_boxes(boxes: Sequence[DukeBox], geometry: Geometry) -> list[tuple[float, ...]]:
    """Duke boxes (source pixels) in model pixels: x, y, width, height."""
    s = geometry.scale
    return [
        (b.x * s + geometry.pad_left, b.y * s + geometry.pad_top, b.width * s, b.height * s)
        for b in boxes
    ]


def positive_slices(box: DukeBox, slices: int) -> range:
    """Duke: round(sqrt(mean box side in px)) slices per lesion, centred on its slice."""
    count = max(1, round(math.sqrt((box.width + box.height) / 2)))
    first = min(max(0, box.slice - count // 2), max(0, slices - count))
    return range(first, min(slices, first + count))


def grid_target(boxes: Sequence[tuple[float, ...]], spec: DetectorSpec, grid: int) -> np.ndarray:
    """(5, G, G): objectness, centre offsets in the cell (0..1), log size / anchor."""
    target = np.zeros((5, grid, grid), dtype=np.float32)
    for x, y, width, height in boxes:
        cx, cy = (x + width / 2) / spec.cell, (y + height / 2) / spec.cell
        column, row = min(grid - 1, max(0, int(cx))), min(grid - 1, max(0, int(cy)))
        target[:, row, column] = (
            1.0,
            cx - column,
            cy - row,
            math.log(max(width, 1.0) / spec.anchor),
            math.log(max(height, 1.0) / spec.anchor),
        )
    return target


def volume_truth(
    case: VolumeCase, slices: int, size: int, difficulty: Difficulty = EASY
) -> tuple[Dataset, list[DukeBox]]:
    ds, phantom = render_volume(case, slices=slices, size=size, difficulty=difficulty)
    key = (case.patient_id, case.study_uid, case.view.lower())
    label = "cancer" if case.cancer else "benign"
    boxes = [
        DukeBox(*key, m.slice, m.x, m.y, m.width, m.height, label, slices) for m in phantom.masses
    ]
    return ds, boxes


Volume = tuple[np.ndarray, Geometry, VolumeKey, list[DukeBox]]


@dataclass(frozen=True)
class DukeReader:
    """A DBT record as the model sees it: a phantom rendered, a Duke file read; either way
    through `duke_volume_tensor` (rescale, each frame's window, flipped as Duke's
    `dcmread_image` flips it), so its boxes fit its pixels. Gives (frames (F, 1, S, S), their
    geometry, the volume's Duke key, its boxes): one volume in memory at a time."""

    slices: int
    phantom_size: int
    input_size: int
    difficulty: Difficulty = EASY  # of a phantom record's volume

    def dataset(self, record: Record) -> tuple[Dataset, list[DukeBox]]:
        if record.volume is not None:
            return volume_truth(record.volume, self.slices, self.phantom_size, self.difficulty)
        if record.image is None:
            raise ValueError(f"{record.key}: neither a phantom nor a file")
        return pydicom.dcmread(record.image), list(record.lesions)

    def __call__(self, record: Record, rng: np.random.Generator | None = None) -> Volume:
        ds, boxes = self.dataset(record)
        key = volume_key(record)
        frames, geometry = duke_volume_tensor(ds, key[2], self.input_size)
        return frames, geometry, key, boxes


def reader_of(config: DetectorConfig) -> DukeReader:
    return DukeReader(config.slices, config.phantom_size, config.input_size, config.difficulty)


def slab(
    volume: Volume, spec: DetectorSpec, negatives: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A volume's training rows: its positive slices per lesion (the Duke rule), each with
    the boxes of every lesion it belongs to, or `negatives` random slices of a volume without
    lesions. (images (k, 1, S, S), grid targets (k, 5, G, G), positive (k,))."""
    frames, geometry, _, boxes = volume
    grid = frames.shape[-1] // spec.cell
    if not boxes:
        count = min(len(frames), negatives)
        chosen_slices = np.sort(rng.choice(len(frames), count, replace=False))
        empty = np.zeros((count, 5, grid, grid), np.float32)
        return frames[chosen_slices], empty, np.zeros(count, dtype=bool)
    chosen: dict[int, list[DukeBox]] = {}
    for box in boxes:
        for index in positive_slices(box, len(frames)):
            chosen.setdefault(index, []).append(box)
    rows = sorted(chosen)
    targets = [grid_target(model_boxes(chosen[row], geometry), spec, grid) for row in rows]
    return frames[rows], np.stack(targets), np.ones(len(rows), dtype=bool)


@dataclass(frozen=True)
class Slab:
    """The training sample of a DBT record (streaming.loader): `slab`, mirrored at random."""

    reader: DukeReader
    spec: DetectorSpec
    negatives: int

    def __call__(self, record: Record, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        images, targets, positive = slab(self.reader(record), self.spec, self.negatives, rng)
        images, targets = mirrored(images, targets, rng)
        return images, targets, positive


def training_slices(
    cases: Sequence[VolumeCase],
    config: DetectorConfig,
    render: Callable[[VolumeCase, int, int], tuple[Dataset, list[DukeBox]]] = volume_truth,
) -> Slices:
    """Every planned volume's `slab` at once (`render`: dataset and Duke boxes), each read by
    `duke_volume_tensor` as training and `detect` read it."""
    rng = np.random.default_rng(config.seed)
    parts = []
    for record in volume_records(cases):
        assert record.volume is not None
        ds, boxes = render(record.volume, config.slices, config.phantom_size)
        frames, geometry = duke_volume_tensor(ds, record.view, config.input_size)
        volume = (frames, geometry, volume_key(record), boxes)
        parts.append(slab(volume, config.model, config.training.negatives_per_volume, rng))
    images, targets, positive = (np.concatenate(part) for part in zip(*parts, strict=True))
    return Slices(images, targets, positive)


# --- training --------------------------------------------------------------------------------


def detection_loss(
    raw: torch.Tensor, targets: torch.Tensor, focal: FocalLoss, box_weight: float
) -> torch.Tensor:
    """Focal loss on objectness + `box_weight` x squared error of the positive cells' boxes."""
    objectness = targets[:, :1]
    loss: torch.Tensor = focal(raw[:, :1], objectness)
    cells = objectness[:, 0] > 0.5
    if cells.any():
        predicted = torch.cat([torch.sigmoid(raw[:, 1:3]), raw[:, 3:5]], dim=1)
        error = (predicted - targets[:, 1:]).pow(2).sum(dim=1)
        loss = loss + box_weight * error[cells].mean()
    return loss


def train(
    model: GridDetector,
    splits: Mapping[str, Sequence[Record]],
    config: DetectorConfig,
    source: Source,
) -> None:
    """Streamed one volume's slab at a time: batches of volumes, half with lesions (seed 000's
    batch control over volumes), Adam on `detection_loss`; after every epoch the validation
    FROC (mean lesion sensitivity at 0.5-4 FP/volume) picks the weights kept, and the run
    stops after `patience` epochs without a better one (Duke's model selection)."""
    spec, reader = config.training, reader_of(config)
    labels = np.array([record.abnormal for record in splits["train"]], dtype=np.float32)
    if len(labels) < spec.batch_size:
        raise ValueError(f"training set of {len(labels)} volumes is smaller than one batch")
    sampler = EpochBatches(
        lambda rng: controlled_batches(labels, spec.batch_size, spec.batch_positive_fraction, rng),
        config.seed,
    )
    focal = FocalLoss(gamma=2.0, use_softmax=False)

    def step(net: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        assert isinstance(net, GridDetector)
        return detection_loss(net.raw(batch[0]), batch[1], focal, spec.box_weight)

    def validate(net: nn.Module) -> float:
        truth, predictions = predict_records(
            torch_runner(net), splits["validation"], reader, config.inference, source.run.workers
        )
        if not truth:
            return 0.0
        result = froc(
            truth,
            predictions,
            volumes=len(splits["validation"]),
            min_distance=config.min_distance_px,
        )
        return float(np.mean(list(result.lesion.values())))

    sample = Slab(reader, config.model, spec.negatives_per_volume)
    fit_streaming(
        model,
        step=step,
        train=loader(splits["train"], sample, sampler, source.run.workers, concatenated),
        sampler=sampler,
        schedule=Schedule(torch.optim.Adam(model.parameters(), lr=spec.learning_rate)),
        epochs=spec.epochs,
        validate=validate,
        metric="validation_froc_sensitivity",
        options=replace(source.run, patience=source.run.patience or spec.patience),
    )


def mirrored(
    images: np.ndarray, targets: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror the rows top-bottom and/or left-right, targets with them: the grid flips, and
    the centre offset inside a cell becomes 1 - offset (objectness and sizes stay)."""
    for axis, offset in ((-1, 1), (-2, 2)):
        if rng.random() < 0.5:
            images, targets = np.flip(images, axis), np.flip(targets, axis).copy()
            present = targets[:, 0] > 0.5
            targets[:, offset][present] = 1.0 - targets[:, offset][present]
    return np.ascontiguousarray(images), np.ascontiguousarray(targets)


# --- inference -------------------------------------------------------------------------------


def volume_key_of(ds: Dataset) -> VolumeKey:
    """PatientID, StudyUID and the Duke view (e.g. "lcc") of a DBT dataset."""
    laterality = ""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "FrameAnatomySequence" in shared[0]:
        laterality = str(shared[0].FrameAnatomySequence[0].get("FrameLaterality", ""))
    laterality = laterality or str(ds.get("ImageLaterality", ""))
    meaning = str(ds.ViewCodeSequence[0].CodeMeaning) if ds.get("ViewCodeSequence") else ""
    view = "mlo" if "oblique" in meaning.lower() else "cc"
    return str(ds.PatientID), str(ds.StudyInstanceUID), f"{laterality.lower()}{view}"


Runner = Callable[[np.ndarray], np.ndarray]  # a volume's frames -> boxes (F, cells, 5)


def onnx_runner(model_path: Path, threads: int) -> Runner:
    return lambda frames: onnx_probabilities(model_path, frames, threads, batch_size=32)


def torch_runner(model: nn.Module, batch_size: int = 32) -> Runner:
    """The PyTorch model's boxes (validation during training, before any export)."""
    device = next(model.parameters()).device

    def run(frames: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            parts = [
                model(torch.from_numpy(frames[i : i + batch_size]).to(device)).float().cpu()
                for i in range(0, len(frames), batch_size)
            ]
        return torch.cat(parts).numpy()

    return run


def detections(
    run: Runner, volume: Volume, settings: DetectorInference, input_size: int
) -> list[Prediction]:
    """A volume's Duke prediction rows: `run` on its frames, boxes fused across slices and
    mapped back by the daemon's own post-processing (cadnode.infer.postprocess), in the frame
    its geometry maps to (Duke's, from `duke_volume_tensor`)."""
    frames, geometry, key, _ = volume
    fusion = fusion_of(settings)
    return [
        Prediction(
            *key,
            x=round(box.x, 1),
            y=round(box.y, 1),
            z=box.first,
            width=round(box.width, 1),
            height=round(box.height, 1),
            depth=box.depth,
            score=round(box.score, 6),
        )
        for box in (
            source_box(fused, geometry)
            for fused in fuse_slices(run(frames), frames, input_size, fusion)
        )
    ]


def detect(
    model_path: Path,
    ds: Dataset,
    settings: DetectorInference,
    input_size: int,
    threads: int = 2,
    key: VolumeKey | None = None,
) -> list[Prediction]:
    """The volume's Duke prediction rows, boxes in the frame Duke's boxes are drawn on (the
    pixels flipped as the authors' `dcmread_image` flips them, `duke_volume_tensor`). `key`
    (PatientID, StudyUID, View) as the Duke file-path CSV names the volume; default from its
    tags."""
    key = key or volume_key_of(ds)
    frames, geometry = duke_volume_tensor(ds, key[2], input_size)
    return detections(
        onnx_runner(model_path, threads), (frames, geometry, key, []), settings, input_size
    )


def predict_records(
    run: Runner,
    records: Sequence[Record],
    reader: DukeReader,
    settings: DetectorInference,
    workers: int,
) -> tuple[list[DukeBox], list[Prediction]]:
    """The true boxes and the predictions of every record, one volume in memory at a time
    (read by the DataLoader's workers while the previous one runs)."""
    truth: list[DukeBox] = []
    predictions: list[Prediction] = []
    volumes = loader(records, reader, in_order(len(records), 1), workers, alone)
    for volume in volumes:
        truth += volume[3]
        predictions += detections(run, volume, settings, reader.input_size)
    return truth, predictions


def fusion_of(settings: DetectorInference) -> Fusion:
    return Fusion(
        min_score=settings.min_score,
        fusion_iou=settings.fusion_iou,
        breast_level=settings.breast_level,
    )


def detect_files(
    bundle: Bundle,
    paths: Sequence[Path],
    threads: int = 2,
    keys: Mapping[Path, VolumeKey] | None = None,
) -> list[Prediction]:
    """Run a detector bundle over DBT files (the `cadnode-train detect` command); `keys`
    names volumes as a Duke file-path CSV does (their View decides the flip)."""
    output = bundle.manifest.output
    known = DetectorInference.model_fields
    settings = DetectorInference(
        **{k: v for k, v in (output.parameters if output else {}).items() if k in known}
    )
    size = bundle.manifest.preprocessing.size
    predictions = []
    for path in tqdm(paths, desc="detect", unit="volume"):
        key = (keys or {}).get(path)
        ds = pydicom.dcmread(path)
        predictions += detect(bundle.model_path, ds, settings, size, threads, key)
    return predictions


# --- evaluation and build --------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionEvaluation:
    report_threshold: float
    report_sensitivity: float  # lesion-based, validation, at report_threshold
    report_fp: float  # FPs per volume there
    test: Froc  # at config.min_distance_px
    test_published: Froc  # at the literal 100 px
    intervals: dict[str, tuple[float, float]]


def predict_set(
    model_path: Path, cases: Sequence[VolumeCase], config: DetectorConfig, desc: str = ""
) -> tuple[list[DukeBox], list[Prediction]]:
    """A bundle's predictions on planned phantom volumes, and their true boxes."""
    run = onnx_runner(model_path, config.threads)
    return predict_records(run, volume_records(cases), reader_of(config), config.inference, 0)


def report_point(
    truth: Sequence[DukeBox],
    predictions: Sequence[Prediction],
    volumes: int,
    config: DetectorConfig,
) -> tuple[float, float, float]:
    """The lowest score threshold with at most `report_fp_per_volume` FPs per volume on
    validation: (threshold, lesion sensitivity, FPs per volume)."""
    best = (1.0, 0.0, 0.0)
    for threshold in sorted({p.score for p in predictions}, reverse=True):
        kept = [p for p in predictions if p.score >= threshold]
        result = froc(truth, kept, volumes=volumes, min_distance=config.min_distance_px)
        fps = result.lesion_curve[0][-1] if result.lesion_curve[0] else 0.0
        if fps > config.inference.report_fp_per_volume:
            break
        best = (threshold, result.lesion_curve[1][-1], fps)
    return best


def bootstrap_sensitivity(
    truth: Sequence[DukeBox],
    predictions: Sequence[Prediction],
    volumes: Sequence[tuple[str, str, str]],
    config: DetectorConfig,
    at_fp: float = 2.0,
    rounds: int = 300,
) -> tuple[float, float]:
    """95 % interval of the lesion sensitivity at `at_fp` FPs/volume, volumes resampled."""
    boxes_of: dict[tuple[str, str, str], list[DukeBox]] = {}
    for box in truth:
        boxes_of.setdefault(box.volume, []).append(box)
    predictions_of: dict[tuple[str, str, str], list[Prediction]] = {}
    for p in predictions:
        predictions_of.setdefault(p.volume, []).append(p)

    def statistic(indices: np.ndarray) -> float:
        boxes, preds = [], []
        for copy, index in enumerate(indices):
            key = volumes[int(index)]
            renamed = f"{key[1]}#{copy}"  # a volume drawn twice counts twice
            boxes += [_restudied(b, renamed) for b in boxes_of.get(key, [])]
            preds += [_restudied(p, renamed) for p in predictions_of.get(key, [])]
        if not boxes:
            return float("nan")
        result = froc(
            boxes,
            preds,
            volumes=len(indices),
            min_distance=config.min_distance_px,
            evaluation_fps=(at_fp,),
        )
        return result.lesion[at_fp]

    return bootstrap_interval(statistic, len(volumes), rounds=rounds, seed=config.seed)


def sensitivity_interval(
    truth: Sequence[DukeBox],
    predictions: Sequence[Prediction],
    volumes: Sequence[tuple[str, str, str]],
    config: DetectorConfig,
    at_fp: float = 2.0,
) -> tuple[float, float]:
    """`bootstrap_sensitivity`, or where it collapses to one value (every resample finds
    every lesion, or none) the Clopper-Pearson interval of the lesions found."""
    low, high = bootstrap_sensitivity(truth, predictions, volumes, config, at_fp)
    if low < high:
        return low, high
    result = froc(
        truth,
        predictions,
        volumes=len(volumes),
        min_distance=config.min_distance_px,
        evaluation_fps=(at_fp,),
    )
    return proportion_interval(round(result.lesion[at_fp] * len(truth)), len(truth))


def _restudied(item: Item, study_uid: str) -> Item:
    return replace(item, study_uid=study_uid)


def evaluate(
    model_path: Path,
    splits: Mapping[str, Sequence[Record]],
    config: DetectorConfig,
    workers: int = 0,
) -> DetectionEvaluation:
    run, reader = onnx_runner(model_path, config.threads), reader_of(config)
    validation = predict_records(run, splits["validation"], reader, config.inference, workers)
    threshold, sensitivity, fps = report_point(*validation, len(splits["validation"]), config)
    truth, predictions = predict_records(run, splits["test"], reader, config.inference, workers)
    volumes = [volume_key(record) for record in splits["test"]]
    count = len(volumes)
    return DetectionEvaluation(
        report_threshold=threshold,
        report_sensitivity=sensitivity,
        report_fp=fps,
        test=froc(truth, predictions, volumes=count, min_distance=config.min_distance_px),
        test_published=froc(truth, predictions, volumes=count, min_distance=MIN_DISTANCE_PX),
        intervals={
            "test_lesion_sensitivity_at_2_fp": sensitivity_interval(
                truth, predictions, volumes, config
            )
        },
    )


def split_cases(config: DetectorConfig) -> dict[str, list[Record]]:
    """The config's phantom seed ranges as records (rendered when read)."""
    return {
        name: volume_records(plan_volumes(split.seeds, config.positive_fraction))
        for name, split in config.splits.named().items()
    }


def trained(
    config_path: Path, checkpoint: Path | None = None, source: Source | None = None
) -> tuple[DetectorConfig, dict[str, list[Record]], str | None, GridDetector]:
    """The config, its splits (the config's phantoms or a Duke folder's volumes by patient),
    the folder's description, and the model trained on them (or the checkpoint's)."""
    config = load_config(config_path)
    source = resolved(source or Source(), "dbt")
    seed_everything(config.seed, config.threads)
    if source.data is None:
        splits, description = split_cases(config), None
    else:
        splits, description = folder_splits(source, config.seed)
    model = GridDetector(config.model, config.input_size)
    fit(
        model,
        lambda: train(model, splits, config, source),
        checkpoint=checkpoint,
        engine="dbt",
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
    """Train (or take a checkpoint's weights), export, check, choose the report threshold on
    validation, FROC on test, bundle."""
    config, splits, description, model = trained(config_path, checkpoint, source)
    workers = (source or Source()).run.workers
    with staged(out) as folder:
        onnx_path = folder / MODEL_FILE
        export_onnx(model, onnx_path, config.input_size, output=OUTPUT)
        check = reader_of(config)(splits["test"][0])[0][:CHECK_BATCH]
        difference = check_against_torch(model, onnx_path, check, config.threads, EXPORT_TOLERANCE)
        evaluation = evaluate(onnx_path, splits, config, workers)
        draw_froc(
            folder / FROC_FILE,
            [
                ("lesion-based", *evaluation.test.lesion_curve),
                ("breast-based", *evaluation.test.breast_curve),
            ],
        )
        data = description or describe_data(config, splits)
        manifest = make_manifest(config, data, evaluation, sha256_of(onnx_path))
        write_bundle(
            folder, manifest, model_card(manifest, config, evaluation, difference, rebuild)
        )
    return Bundle(out)


def metrics(evaluation: DetectionEvaluation) -> dict[str, float]:
    figures: dict[str, float] = {}
    for prefix, result in (
        ("test", evaluation.test),
        ("test_published_100px", evaluation.test_published),
    ):
        for kind, values in (("lesion", result.lesion), ("breast", result.breast)):
            for fp, value in values.items():
                figures[f"{prefix}_{kind}_sensitivity_at_{fp:g}_fp".replace(".", "_")] = value
    figures["validation_fp_per_volume_at_report"] = evaluation.report_fp
    return figures


def make_manifest(
    config: DetectorConfig,
    training_data: str,
    evaluation: DetectionEvaluation,
    sha256: str,
) -> Manifest:
    return Manifest(
        name=config.name,
        version=config.version,
        task=TaskKind.detect,
        description="Digital breast tomosynthesis mass detector: a single-stage grid detector "
        "run on every slice (seed 003 A.8), boxes fused across slices. Output: boxes with scores.",
        inputs=Inputs(
            modalities=["MG"],
            sop_classes=[BreastTomosynthesisImageStorage],
            body_parts=["BREAST"],
        ),
        preprocessing=Preprocessing(size=config.input_size),
        labels=[MASS],
        operating_points={
            "report": OperatingPoint(
                threshold=evaluation.report_threshold,
                description="Report a fused box when its score is at or above this: the lowest "
                f"threshold with at most {config.inference.report_fp_per_volume:g} false "
                "positive(s) per volume on the validation volumes (Duke true-positive rule).",
                sensitivity=round(evaluation.report_sensitivity, 6),
            ),
            "candidates": OperatingPoint(
                threshold=config.inference.min_score,
                description="Per-slice boxes below this score are dropped before fusion across "
                f"slices (weighted box fusion, IoU {config.inference.fusion_iou:g}).",
            ),
        },
        model=ModelFile(file=MODEL_FILE, sha256=sha256, input=INPUT, output=OUTPUT),
        output=Output(
            shape=["batch", "box", "field"],
            fields=FIELDS,
            description=f"One box per {config.model.cell} px grid cell of each slice: score "
            "(sigmoid objectness) and the box's top-left corner, width and height in model-input "
            "pixels; map back through cadnode.infer.preprocess.Geometry (frames_to_tensor). "
            "Fuse across "
            "slices (cadnode.infer.postprocess.fuse_slices) before reporting.",
            parameters={
                "cell": float(config.model.cell),
                "anchor": config.model.anchor,
                **config.inference.model_dump(),
            },
        ),
        provenance=provenance(
            training_data, config.date, metrics(evaluation), evaluation.intervals
        ),
    )


def describe_data(config: DetectorConfig, splits: Mapping[str, Sequence[Record]]) -> str:
    parts = []
    for name, split in config.splits.named().items():
        cases = [record.volume for record in splits[name] if record.volume is not None]
        lesions = sum(case.masses for case in cases)
        positive = sum(case.masses > 0 for case in cases)
        parts.append(
            f"{name}: {split.count} volumes, seeds {split.seeds.start}-{split.seeds.stop - 1} "
            f"({positive} with masses, {lesions} masses planned)."
        )
    return (
        "Synthetic DBT phantoms (cadnode/infer/phantoms/breast.py: Breast Tomosynthesis Image "
        f"multi-frame DICOM, {config.slices} slices of {config.phantom_size}x{config.phantom_size} "
        "px at 0.5 mm), windowed from their functional groups by "
        f"cadnode.infer.preprocess.frames_to_tensor to {config.input_size} px. " + " ".join(parts)
    )


def model_card(
    manifest: Manifest,
    config: DetectorConfig,
    evaluation: DetectionEvaluation,
    export_difference: float,
    rebuild: str,
) -> str:
    def row(name: str, result: Froc) -> str:
        lesion = " | ".join(f"{result.lesion[fp]:.3f}" for fp in EVALUATION_FPS)
        breast = " | ".join(f"{result.breast[fp]:.3f}" for fp in EVALUATION_FPS)
        return f"| {name}, lesion-based | {lesion} |\n| {name}, breast-based | {breast} |"

    header = " | ".join(f"{fp:g} FP" for fp in EVALUATION_FPS)
    interval_2fp = evaluation.intervals["test_lesion_sensitivity_at_2_fp"]
    sections = [
        "## What it does\n\n" + manifest.description + " Inputs: Breast Tomosynthesis Image "
        "volumes; every frame is windowed with its own Frame VOI LUT (functional groups) by "
        "`cadnode.infer.preprocess.frames_to_tensor` to "
        f"{config.input_size} px. The ONNX graph takes "
        f"`image` (N, 1, {config.input_size}, {config.input_size}), one slice per row, and returns "
        f"`boxes` (N, {(config.input_size // config.model.cell) ** 2}, 5): score, x, y, width, "
        "height per grid cell.",
        "## Data\n\n" + manifest.provenance.training_data + "\n\n" + PHANTOM_CAVEAT,
        "## Model and training\n\nSeed 003 A.8's single-stage detector, scaled to the phantoms: "
        f"a DenseNet-style backbone (stem {config.model.stem} channels, dense blocks "
        f"{config.model.blocks}, growth {config.model.growth}, transitions halving channels), "
        f"{config.model.cell} px cells with objectness and one box (anchor "
        f"{config.model.anchor:g} px), objectness bias prior {config.model.objectness_prior:.4f}. "
        "Positive slices per lesion: round(sqrt(mean box side)) around its central slice (the "
        "Duke rule); negatives: slices of normal volumes; each batch "
        f"{config.training.batch_positive_fraction:g} positive (seed 000's batch control). Adam "
        f"(lr {config.training.learning_rate:g}), focal loss on objectness, MSE on boxes, random "
        "flips. Slices' boxes fused across slices by weighted box fusion (ensemble-boxes).",
        "## Held-out test FROC\n\nDuke BCS-DBT evaluation (training.froc; `cadnode-train froc`): "
        "a detection is a true positive when its centre is within max(half the lesion box "
        "diagonal, D) of the lesion centre and its centre slice within 25 % of the volume's "
        f"slices. D = {config.min_distance_px:g} px is the published 100 px (~10 mm at Duke's "
        "~0.1 mm pixels) carried to these 0.5 mm pixels; the literal 100 px, which covers much of "
        "a 128 px slice, is shown too. Sensitivity at false positives per volume:\n\n"
        f"| rule | {header} |\n|---|"
        + "---|" * len(EVALUATION_FPS)
        + "\n"
        + row(f"D = {config.min_distance_px:g} px", evaluation.test)
        + "\n"
        + row("D = 100 px (literal)", evaluation.test_published)
        + f"\n\nLesion sensitivity at 2 FP/volume, 95 % bootstrap interval over test volumes "
        "(Clopper-Pearson of the lesions found where the bootstrap collapses to one value): "
        f"{interval(interval_2fp)}. {evaluation.test.lesions} lesions in "
        f"{evaluation.test.volumes} test volumes. Operating point `report` (chosen on "
        f"validation): threshold {evaluation.report_threshold:.4f}, validation lesion "
        f"sensitivity {evaluation.report_sensitivity:.3f} at {evaluation.report_fp:.2f} FP/volume."
        f"\n\n![FROC of the held-out test volumes]({FROC_FILE})",
    ]
    return compose_card(
        manifest,
        sections,
        export_difference=export_difference,
        rebuild=rebuild,
        config=config,
        tolerance=EXPORT_TOLERANCE,
    )
