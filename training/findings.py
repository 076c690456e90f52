"""cxr-findings: multi-label chest findings, after seed 004 (Kim et al., "Chest X-Ray Feature
Pyramid Sum Model with Diseased Area Data Augmentation Method", CXR-LT 2023).

- Data: CXR-LT style labels (one 0/1 column per finding, "No Finding" among them) with
  boxes where a finding has them (VinDr-CXR style `annotations.csv`). The phantoms draw
  each finding at a long-tailed frequency (head / medium / tail) with its box.
- Model, the Feature Pyramid Sum Model (FPSM): a small ResNet (the paper's is TResNet) whose
  stages feed a feature pyramid (FPN: lateral 1x1 convolutions, top-down nearest upsampling
  and addition); the chosen levels (the paper's best: 4th + 3rd + 2nd) are pooled to the
  4th level's size and SUMMED, then one multi-label head.
- Loss: the paper names none. Asymmetric loss (ASL, Ridnik et al. 2021, the TResNet authors'
  own multi-label loss) down-weights the many easy negatives of a long-tailed label set,
  which is what the tail classes need; plain BCE is the alternative (`loss: bce`).
- DADAM, the diseased-area data augmentation for minority classes: the training set is
  extended with synthetic images, for each minority class up to a target count. Half are
  CutMix (a box of a donor with the class pasted onto a "No Finding" image, the label added),
  half Mixup (a box of the class plus a box of the class most correlated with it, blended at
  transparency 0.6 onto an image that has a finding, both labels added). As in the paper the
  model is trained on the original set, then fine-tuned on the augmented one.

The output "findings" holds P(abnormal) = 1 - P(No Finding) first, then every label; the
exported graph's declared output "probability" is P(abnormal) alone, which the node's
classify path reads against the rule-out operating point (training.findings_build).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, model_validator
from torch import nn

from cadnode.core.yamlfile import load_model
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.bundle import Code, Strict
from cadnode.infer.phantoms.chest import (
    CARDIOMEGALY,
    EFFUSION,
    NODULE,
    ChestPhantom,
    chest_dataset,
    make_chest_phantom,
)
from cadnode.infer.preprocess import fit_square, image_to_tensor
from training import datasets
from training.records import ABNORMAL, CXRLT_LABELS, NO_FINDING, Record
from training.ruleout import CalibrationSpec, Splits
from training.streaming import film_tensor

BoxXYWH = tuple[int, int, int, int]
ANNOTATIONS_CSV = "annotations.csv"  # VinDr-CXR's box layout
ANNOTATION_HEADER = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
# The labels the phantoms draw (CXR-LT names), with SNOMED CT codes. "No Finding" is the
# node's normality concept (SCT 17621005 "Normal", as the SR's rule-out decision codes it).
CODES: dict[str, Code] = {
    NO_FINDING: Code(value="17621005", scheme="SCT", meaning="Normal"),
    "Consolidation": Code(value="95436008", scheme="SCT", meaning="Lung consolidation"),
    "Pleural Effusion": Code(value="60046008", scheme="SCT", meaning="Pleural effusion"),
    "Cardiomegaly": Code(value="8186001", scheme="SCT", meaning="Cardiomegaly"),
    "Pneumothorax": Code(value="36118008", scheme="SCT", meaning="Pneumothorax"),
    "Nodule": Code(value="427359005", scheme="SCT", meaning="Solitary nodule of lung"),
}
ABNORMAL_CODE = Code(value="263654008", scheme="SCT", meaning="Abnormal")
# Which phantom drawing each label is (cadnode.infer.phantoms.chest).
DRAWN = {
    "Consolidation": "opacity",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": EFFUSION,
    "Cardiomegaly": CARDIOMEGALY,
    "Nodule": NODULE,
}
# Cardiomegaly is drawn preferentially where there is an effusion (the two go together in
# real films, heart failure), so the label correlations DADAM's Mixup follows are not all 0.
TOGETHER = {"Cardiomegaly": ("Pleural Effusion", 4.0)}


# --- configuration ---------------------------------------------------------------------------


class FpsmSpec(Strict):
    widths: list[int] = Field(min_length=4, max_length=4, description="ResNet stage widths")
    fpn_width: int = Field(gt=0)
    # Pyramid levels summed (1 = the first stage's, 4 = the deepest); [4] is the backbone alone.
    levels: list[int] = Field(default=[4, 3, 2], min_length=1)

    @model_validator(mode="after")
    def _levels(self) -> FpsmSpec:
        if not set(self.levels) <= {1, 2, 3, 4} or 4 not in self.levels:
            raise ValueError("levels are among 1-4 and include 4 (the deepest)")
        return self


class FindingsTrainSpec(Strict):
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=1)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    loss: Literal["asl", "bce"] = "asl"
    gamma_negative: float = Field(default=4.0, ge=0)  # ASL's defaults (Ridnik et al.)
    gamma_positive: float = Field(default=0.0, ge=0)
    clip: float = Field(default=0.05, ge=0, lt=1)


class DadamSpec(Strict):
    enabled: bool = True
    # Each minority (medium or tail) class is brought up to this share of the training images.
    target_share: float = Field(default=0.10, gt=0, le=1)
    cutmix_share: float = Field(default=0.5, ge=0, le=1)  # the rest are Mixup
    transparency: float = Field(default=0.6, gt=0, le=1)  # the paper's Mixup patch alpha
    epochs: int = Field(default=2, ge=0, description="fine-tuning epochs on the augmented set")
    learning_rate_scale: float = Field(default=0.3, gt=0)


class GroupSpec(Strict):
    head_share: float = Field(default=0.10, gt=0, lt=1)
    tail_share: float = Field(default=0.01, gt=0, lt=1)


class PrefilterSpec(Strict):
    """Seed 002's two-class rule on P(No Finding) (training.prefilter)."""

    alpha: float = Field(default=0.997, ge=0, le=1)
    beta: float = Field(default=0.3, ge=0, le=1)


class ReportSpec(Strict):
    """How each finding's `report` point is chosen on validation (training.findings_build):
    the best F1 where the label has at least `min_positives_for_f1` positives (fewer make the
    best-F1 point noise), else the lowest threshold with specificity >= `fallback_specificity`
    on the negatives; a label with too few negatives to measure even that is not reported."""

    min_positives_for_f1: int = Field(default=10, ge=1)
    fallback_specificity: float = Field(default=0.99, gt=0, lt=1)


class FindingsConfig(Strict):
    """training/configs/findings*.yaml."""

    name: str = "cxr-findings"
    version: str = "0.1.0"
    seed: int = 0
    threads: int = Field(default=2, gt=0)
    phantom_size: int = Field(default=256, gt=31)
    input_size: int = Field(default=128, gt=15)
    # The labels in output order, each with its phantom frequency (ignored for --data).
    # "No Finding" is never listed: it is every film without a finding.
    frequencies: dict[str, float]
    codes: dict[str, Code] = Field(default_factory=dict, description="codes of other labels")
    splits: Splits
    model: FpsmSpec
    training: FindingsTrainSpec
    dadam: DadamSpec = DadamSpec()
    groups: GroupSpec = GroupSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    prefilter: PrefilterSpec = PrefilterSpec()
    report: ReportSpec = ReportSpec()
    date: str | None = None

    @model_validator(mode="after")
    def _labels(self) -> FindingsConfig:
        if NO_FINDING in self.frequencies:
            raise ValueError(f"{NO_FINDING!r} is implied (no finding drawn); do not list it")
        uncoded = [n for n in self.frequencies if n not in CODES and n not in self.codes]
        if uncoded:
            raise ValueError(f"labels without a code: {uncoded}; give them under `codes`")
        if not all(0 < f < 1 for f in self.frequencies.values()):
            raise ValueError("frequencies lie in (0, 1)")
        return self

    @property
    def labels(self) -> list[str]:
        """The model's labels, in output order: "No Finding" first, then the findings."""
        return [NO_FINDING, *self.frequencies]

    def code(self, label: str) -> Code:
        return self.codes.get(label) or CODES[label]


def load_config(path: Path) -> FindingsConfig:
    return load_model(path, FindingsConfig)


# --- phantoms --------------------------------------------------------------------------------


def plan_records(seeds: range, frequencies: Mapping[str, float]) -> list[Record]:
    """Multi-label phantom records: each finding on exactly round(n * frequency) films (at
    least one, so every split can score every class), chosen at random (reproducibly)."""
    count = len(seeds)
    rng = np.random.default_rng([seeds.start, 4])
    present: dict[str, np.ndarray] = {}
    for label, frequency in frequencies.items():
        weights = np.ones(count)
        if label in TOGETHER and TOGETHER[label][0] in present:
            partner, factor = TOGETHER[label]
            weights[present[partner]] = factor
        chosen = rng.choice(
            count,
            size=min(count, max(1, round(count * frequency))),
            replace=False,
            p=weights / weights.sum(),
        )
        present[label] = np.zeros(count, dtype=bool)
        present[label][chosen] = True
    records = []
    for index, seed in enumerate(seeds):
        labels = {label: float(shown[index]) for label, shown in present.items()}
        labels[NO_FINDING] = float(not any(labels.values()))
        labels[ABNORMAL] = 1.0 - labels[NO_FINDING]
        records.append(Record(f"phantom-{seed}", f"PHANTOM{seed:08d}", None, labels, seed=seed))
    return records


def phantom_of(record: Record, size: int) -> ChestPhantom:
    """The phantom film a findings record was planned from."""
    if record.seed is None:
        raise ValueError(f"{record.key} is not a phantom")
    drawn = {DRAWN[k] for k, v in record.labels.items() if k in DRAWN and v > 0.5}
    return make_chest_phantom(
        record.seed,
        size=size,
        opacity="opacity" in drawn,
        pneumothorax="pneumothorax" in drawn,
        extra=sorted(drawn - {"opacity", "pneumothorax"}),
    )


def phantom_boxes(phantom: ChestPhantom) -> dict[str, list[BoxXYWH]]:
    """Each drawn finding's boxes (x, y, w, h, phantom pixels), by label."""
    boxes: dict[str, list[BoxXYWH]] = {}
    if phantom.opacity_boxes:
        boxes["Consolidation"] = list(phantom.opacity_boxes)
    if phantom.pneumothorax_mask.any():
        rows, columns = np.nonzero(phantom.pneumothorax_mask)
        top, left = int(rows.min()), int(columns.min())
        boxes["Pneumothorax"] = [
            (left, top, int(columns.max()) - left + 1, int(rows.max()) - top + 1)
        ]
    drawn = {value: key for key, value in DRAWN.items()}
    for kind, found in phantom.finding_boxes.items():
        if found:
            boxes[drawn[kind]] = list(found)
    return boxes


def write_findings_set(
    out: Path, *, count: int, first_seed: int, size: int, frequencies: Mapping[str, float]
) -> int:
    """`cxr-NNNNN.dcm` films with a CXR-LT style `train.csv` (dicom_id, subject_id, study_id,
    one 0/1 column per label, "No Finding" last as in CXR-LT) and the boxes in a VinDr-CXR
    style `annotations.csv` (image_id, class_name, x_min, y_min, x_max, y_max)."""
    records = plan_records(range(first_seed, first_seed + count), frequencies)
    labels = [*frequencies, NO_FINDING]
    rows, boxes = [], []
    out.mkdir(parents=True, exist_ok=True)
    for index, record in enumerate(records):
        name = f"cxr-{index:05d}"
        phantom = phantom_of(record, size)
        assert record.seed is not None
        ds = chest_dataset(
            phantom, patient_id=record.patient, patient_name="Phantom^Chest", seed=record.seed
        )
        ds.save_as(out / f"{name}.dcm", enforce_file_format=True)
        rows.append(
            [name, record.patient, ds.StudyInstanceUID, *(int(record.labels[k]) for k in labels)]
        )
        for label, found in sorted(phantom_boxes(phantom).items()):
            boxes += [[name, label, x, y, x + w, y + h] for x, y, w, h in found]
    datasets.write_rows(out / CXRLT_LABELS, ["dicom_id", "subject_id", "study_id", *labels], rows)
    datasets.write_rows(out / ANNOTATIONS_CSV, ANNOTATION_HEADER, boxes)
    return len(records)


def read_annotations(path: Path) -> dict[str, list[tuple[str, BoxXYWH]]]:
    """VinDr-CXR style boxes by image id: (label, (x, y, w, h)) in source pixels."""
    rows = datasets.read_rows(path)
    datasets.require_columns(path, rows, ANNOTATION_HEADER)
    found: dict[str, list[tuple[str, BoxXYWH]]] = {}
    for line, row in enumerate(rows, start=2):
        try:
            x0, y0, x1, y1 = (round(float(row[k])) for k in ANNOTATION_HEADER[2:])
        except ValueError as error:
            raise ValueError(f"{path}:{line}: a box corner is not a number: {error}") from error
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{path}:{line}: an empty box ({x0}, {y0}, {x1}, {y1})")
        found.setdefault(row["image_id"], []).append(
            (row["class_name"], (x0, y0, x1 - x0, y1 - y0))
        )
    return found


# --- one film as model input -----------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """A diseased area pasted by DADAM: the donor film, the label and its box (source
    pixels; None: a phantom's own box, found when it is drawn), and its opacity."""

    donor: Record
    label: str
    box: BoxXYWH | None
    alpha: float


@dataclass(frozen=True)
class Synthetic(Record):
    """A DADAM image: `host` with `patches` pasted onto it; labels = host's plus theirs."""

    host: Record | None = None
    patches: tuple[Patch, ...] = ()


@dataclass(frozen=True)
class FindingsFilm:
    """A record as (image (1, S, S), labels (L,) in `labels` order) for the FPSM."""

    labels: tuple[str, ...]
    size: int
    phantom_size: int

    def film(self, record: Record) -> tuple[np.ndarray, float, int, int, ChestPhantom | None]:
        """The film in model space, with how source pixels map to it (scale, top, left) and,
        for a phantom, the phantom (its boxes)."""
        if record.image is None:
            phantom = phantom_of(record, self.phantom_size)
            ds = chest_dataset(phantom, patient_id=record.patient, patient_name="Phantom^Chest")
            tensor, geometry = image_to_tensor(ds, self.size, limit=DEFAULT_LIMIT)
            return tensor, geometry.scale, geometry.pad_top, geometry.pad_left, phantom
        if record.image.suffix.lower() == ".dcm":
            import pydicom  # only for folders of DICOM files

            ds = pydicom.dcmread(record.image)
            tensor, geometry = image_to_tensor(ds, self.size, limit=DEFAULT_LIMIT)
            return tensor, geometry.scale, geometry.pad_top, geometry.pad_left, None
        tensor = film_tensor(record.image, self.size)
        blank = np.zeros(image_size(record.image), np.float32)
        _, (scale, top, left) = fit_square(blank, self.size)
        return tensor, scale, top, left, None

    def image(self, record: Record) -> np.ndarray:
        if isinstance(record, Synthetic) and record.host is not None:
            image = self.film(record.host)[0].copy()
            for patch in record.patches:
                paste(image, *self.area(patch), patch.alpha)
            return image
        return self.film(record)[0]

    def area(self, patch: Patch) -> tuple[np.ndarray, int, int]:
        """The donor's diseased area in model space: (pixels, top, left)."""
        tensor, scale, top, left, phantom = self.film(patch.donor)
        box = patch.box
        if box is None:
            assert phantom is not None
            box = phantom_boxes(phantom)[patch.label][0]
        x, y, w, h = box
        r0, c0 = top + int(np.floor(y * scale)), left + int(np.floor(x * scale))
        r1, c1 = top + int(np.ceil((y + h) * scale)), left + int(np.ceil((x + w) * scale))
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(max(r1, r0 + 1), self.size), min(max(c1, c0 + 1), self.size)
        return tensor[:, r0:r1, c0:c1], r0, c0

    def __call__(self, record: Record, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        target = np.array([record.labels.get(k, 0.0) for k in self.labels], dtype=np.float32)
        return self.image(record), target


def image_size(path: Path) -> tuple[int, int]:
    """(rows, columns) of a PNG/JPG, read from its header."""
    with Image.open(path) as image:
        columns, rows = image.size
    return rows, columns


def paste(image: np.ndarray, patch: np.ndarray, top: int, left: int, alpha: float) -> None:
    """Blend `patch` into `image` (1, S, S) at (top, left) in place: alpha 1 replaces the
    area (CutMix), below 1 mixes it in at that opacity (the paper's Mixup, 0.6)."""
    _, rows, columns = patch.shape
    area = image[:, top : top + rows, left : left + columns]
    area[...] = alpha * patch[:, : area.shape[1], : area.shape[2]] + (1 - alpha) * area


# --- DADAM -----------------------------------------------------------------------------------


def label_correlations(records: Sequence[Record], labels: Sequence[str]) -> np.ndarray:
    """|Pearson correlation| between the labels over `records`, diagonal 0 (the paper's
    Fig. 2(d) as it plots it); 0 where a label never varies."""
    matrix = np.array([[r.labels.get(k, 0.0) for k in labels] for r in records])
    spread = matrix.std(axis=0)
    centred = (matrix - matrix.mean(axis=0)) / np.where(spread > 0, spread, 1)
    correlation = np.abs(centred.T @ centred / max(len(records), 1))
    np.fill_diagonal(correlation, 0.0)
    return correlation


def dadam_records(
    train: Sequence[Record],
    findings: Sequence[str],
    groups: Mapping[str, str],
    spec: DadamSpec,
    boxes: Mapping[str, Sequence[tuple[str, BoxXYWH]]],
    seed: int,
) -> list[Synthetic]:
    """The synthetic images DADAM adds: for each medium or tail class with boxes, enough to
    bring it to `target_share` of the training set. CutMix: one donor box onto a "No Finding"
    film (alpha 1). Mixup: a box of the class and a box of the class most correlated with it
    onto a film with a finding, both at the paper's transparency. Planned from labels only
    (nothing is drawn until a batch asks), so memory does not grow."""
    rng = np.random.default_rng([seed, 404])
    correlation = label_correlations(train, findings)
    normal = [r for r in train if r.labels.get(NO_FINDING, 0) > 0.5]
    diseased = [r for r in train if r.labels.get(NO_FINDING, 0) <= 0.5]
    donors = {label: donor_patches(train, label, boxes) for label in findings}
    target = round(spec.target_share * len(train))
    made: list[Synthetic] = []
    for index, label in enumerate(findings):
        have = sum(r.labels.get(label, 0) > 0.5 for r in train)
        if groups.get(label) == "head" or not donors[label]:
            continue
        ranked = [findings[j] for j in np.argsort(-correlation[index]) if donors[findings[j]]]
        partner = next((p for p in ranked if p != label), None)
        for _ in range(max(0, target - have)):
            cutmix = rng.random() < spec.cutmix_share or partner is None or not diseased
            hosts = normal if cutmix and normal else diseased or normal
            host = hosts[int(rng.integers(len(hosts)))]
            alpha = 1.0 if cutmix else spec.transparency
            chosen = [label] if cutmix else [label, str(partner)]
            patches = tuple(pick(donors[k], k, rng, alpha) for k in chosen)
            made.append(synthetic(host, patches, len(made)))
    return made


def donor_patches(
    train: Sequence[Record], label: str, boxes: Mapping[str, Sequence[tuple[str, BoxXYWH]]]
) -> list[tuple[Record, BoxXYWH | None]]:
    """Every training film with a box of `label`: a phantom's (drawn, found later) or one of
    the annotations'."""
    found: list[tuple[Record, BoxXYWH | None]] = []
    for record in train:
        if record.labels.get(label, 0) <= 0.5:
            continue
        if record.image is None:
            found.append((record, None))
        else:
            found += [(record, box) for name, box in boxes.get(record.key, ()) if name == label]
    return found


def pick(
    donors: Sequence[tuple[Record, BoxXYWH | None]],
    label: str,
    rng: np.random.Generator,
    alpha: float,
) -> Patch:
    """One donor's area of `label` (a donor may carry other findings: only this box goes)."""
    record, box = donors[int(rng.integers(len(donors)))]
    return Patch(record, label, box, alpha)


def synthetic(host: Record, patches: tuple[Patch, ...], number: int) -> Synthetic:
    labels = dict(host.labels)
    for patch in patches:
        labels[patch.label] = 1.0
    labels[NO_FINDING], labels[ABNORMAL] = 0.0, 1.0
    return Synthetic(
        key=f"dadam-{number}",
        patient=host.patient,
        image=None,
        labels=labels,
        seed=host.seed,
        host=host,
        patches=patches,
    )


# --- the model -------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with an identity (or 1x1 projected) shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(inplace=True),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class FeaturePyramidSum(nn.Module):
    """FPSM: ResNet stages C1..C4 (strides 2, 4, 8, 16 of the input), an FPN over them, the
    chosen levels average-pooled to C4's size and summed, a 3x3 conv, global average and max
    pooling, one linear layer: a logit per label. `forward` returns (P(abnormal), findings),
    the exported outputs, with P(abnormal) = 1 - P(label 0 = No Finding)."""

    def __init__(self, spec: FpsmSpec, labels: int) -> None:
        super().__init__()
        widths, width = spec.widths, spec.fpn_width
        self.levels = sorted(spec.levels, reverse=True)
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.ModuleList(
            BasicBlock(widths[max(i - 1, 0)], widths[i], 1 if i == 0 else 2) for i in range(4)
        )
        lowest = min(self.levels)
        self.lateral = nn.ModuleList(nn.Conv2d(widths[i], width, 1) for i in range(lowest - 1, 4))
        self.lowest = lowest
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)
        )
        self.head = nn.Linear(2 * width, labels)

    def pyramid(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """FPN levels P_lowest..P4 (top-down: each is its lateral plus the level above,
        upsampled)."""
        stages, x = [], self.stem(image)
        for stage in self.stages:
            x = stage(x)
            stages.append(x)
        levels: dict[int, torch.Tensor] = {}
        above: torch.Tensor | None = None
        for level in range(4, self.lowest - 1, -1):
            lateral = self.lateral[level - self.lowest](stages[level - 1])
            if above is not None:
                lateral = lateral + F.interpolate(above, scale_factor=2.0, mode="nearest")
            levels[level] = above = lateral
        return levels

    def summed(self, image: torch.Tensor) -> torch.Tensor:
        """The chosen levels pooled to P4's size and summed (the paper's feature sum)."""
        levels = self.pyramid(image)
        total = levels[4]
        for level in self.levels[1:]:
            factor = 2 ** (4 - level)
            total = total + F.avg_pool2d(levels[level], factor, factor)
        return total

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(self.summed(image))
        pooled = torch.cat([fused.mean(dim=(2, 3)), fused.amax(dim=(2, 3))], dim=1)
        out: torch.Tensor = self.head(pooled)
        return out

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.sigmoid(self.logits(image))
        abnormal = 1.0 - labels[:, 0]
        return abnormal, torch.cat([abnormal[:, None], labels], dim=1)


# --- the loss --------------------------------------------------------------------------------


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    gamma_negative: float = 4.0,
    gamma_positive: float = 0.0,
    clip: float = 0.05,
) -> torch.Tensor:
    """ASL (Ridnik et al., ICCV 2021): positives -(1-p)^g+ log p; negatives, with the
    probability shifted down by `clip` (easy negatives below it count nothing),
    -p_m^g- log(1 - p_m). Summed over labels, averaged over the batch."""
    p = torch.sigmoid(logits.float())
    shifted = (p - clip).clamp(min=0) if clip > 0 else p
    eps = 1e-8
    positive = targets * (1 - p).pow(gamma_positive) * torch.log(p.clamp(min=eps))
    negative = (1 - targets) * shifted.pow(gamma_negative) * torch.log((1 - shifted).clamp(min=eps))
    return -(positive + negative).sum(dim=1).mean()


def batch_loss(
    spec: FindingsTrainSpec, logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    if spec.loss == "bce":
        return (
            F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
            .sum(1)
            .mean()
        )
    return asymmetric_loss(
        logits,
        targets,
        gamma_negative=spec.gamma_negative,
        gamma_positive=spec.gamma_positive,
        clip=spec.clip,
    )
