"""Where an engine's training data comes from: the config's phantom seed ranges, or a dataset
folder (`--data DIR --layout L`) indexed by training.records and split by patient; and the
per-engine `sample` functions that turn one record into model input and target.

A sample function is a small frozen dataclass (picklable for the DataLoader's worker
processes) called with a record and that item's generator (for augmentation draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, RandAdjustContrast, RandRotate, RandScaleIntensity

from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.phantoms.chest import plan_cases, render
from cadnode.infer.phantoms.difficulty import EASY, Difficulty
from cadnode.infer.preprocess import image_to_tensor
from training.records import (
    LAYOUTS,
    Record,
    chest_case,
    chest_records,
    describe_records,
    index_folder,
    split_records,
)
from training.streaming import RunOptions, film_tensor

# Which layout a folder holding several label files is read as, per engine (the phantom
# chest folder holds RSNA, SIIM, Montgomery, CXR-LT and folder labels side by side).
MARKERS = {
    "duke": "BCS-DBT-file-paths.csv",
    "rsna": "stage_2_train_labels.csv",
    "siim": "train-rle.csv",
    "montgomery": "ManualMask",
    "shenzhen": "mask",
    "cxrlt": "train.csv",
    "folder": "labels.csv",
}
PREFERENCE = {
    "ruleout": ("rsna", "cxrlt", "siim", "folder", "montgomery", "shenzhen"),
    "segmenter": ("siim", "montgomery", "shenzhen"),
    "dbt": ("duke",),
    "findings": ("cxrlt", "folder"),  # multi-label: a 0/1 column per finding
}


@dataclass(frozen=True)
class Source:
    """`--data` and what goes with it; `data` None: the config's phantom seeds."""

    data: Path | None = None
    layout: str | None = None
    labels: Path | None = None
    validation: float = 0.15
    test: float = 0.15
    folds: int | None = None
    fold: int = 0
    run: RunOptions = field(default_factory=RunOptions)

    def arguments(self) -> list[str]:
        """The command-line words that name this data (for the card's rebuild command)."""
        if self.data is None:
            return []
        words = ["--data", str(self.data), "--layout", str(self.layout)]
        if self.labels is not None:
            words += ["--labels", str(self.labels)]
        if self.folds is not None:
            words += ["--folds", str(self.folds), "--fold", str(self.fold)]
        else:
            words += ["--validation", f"{self.validation:g}", "--test", f"{self.test:g}"]
        if self.run.patience is not None:
            words += ["--patience", str(self.run.patience)]
        return words


def guess_layout(root: Path, engine: str) -> str:
    """The engine's first layout whose marker file or folder is in `root`."""
    for layout in PREFERENCE[engine]:
        if (root / MARKERS[layout]).exists():
            return layout
    raise ValueError(
        f"{root}: no {engine} dataset layout recognised; name one with --layout "
        f"({', '.join(PREFERENCE[engine])})"
    )


def resolved(source: Source, engine: str) -> Source:
    """`source` with its layout named (guessed from the folder when not given) and checked."""
    if source.data is None:
        return source
    layout = source.layout or guess_layout(source.data, engine)
    if layout not in LAYOUTS or layout not in PREFERENCE[engine]:
        raise ValueError(
            f"engine {engine} does not train on the {layout} layout "
            f"(it does on {', '.join(PREFERENCE[engine])})"
        )
    return Source(**{**source.__dict__, "layout": layout})


def folder_splits(source: Source, seed: int) -> tuple[dict[str, list[Record]], str]:
    """The folder's records split by patient, and the sentence describing them."""
    assert source.data is not None and source.layout is not None
    records = index_folder(source.data, source.layout, source.labels)
    splits = split_records(
        records,
        validation=source.validation,
        test=source.test,
        seed=seed,
        folds=source.folds,
        fold=source.fold,
    )
    return splits, describe_records(source.layout, source.data, splits)


def phantom_chest_splits(
    splits: dict[str, range], positive_fraction: float
) -> dict[str, list[Record]]:
    return {
        name: chest_records(plan_cases(seeds, positive_fraction)) for name, seeds in splits.items()
    }


# --- sample functions ------------------------------------------------------------------------


def seed_002_augmentation() -> Compose:
    """Seed 002's classification augmentations that MONAI has: brightness and contrast
    0.7-1.3, rotation within +-10 degrees (each half the time)."""
    return Compose(
        [
            RandScaleIntensity(factors=0.3, prob=0.5),
            RandAdjustContrast(gamma=(0.7, 1.3), prob=0.5),
            RandRotate(range_x=math.radians(10), prob=0.5, padding_mode="zeros"),
        ]
    )


@dataclass(frozen=True)
class ChestFilm:
    """A chest record as (image (1, S, S), abnormal (scalar)) for the rule-out classifier."""

    size: int
    phantom_size: int
    augment: bool = False
    difficulty: Difficulty = EASY  # of a phantom record's film

    def image(self, record: Record) -> np.ndarray:
        if record.image is None:
            ds = render(chest_case(record), self.phantom_size, self.difficulty)
            return image_to_tensor(ds, self.size, limit=DEFAULT_LIMIT)[0]
        return film_tensor(record.image, self.size)

    def __call__(self, record: Record, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        image = self.image(record)
        if self.augment:
            image = augmented(image, rng)
        return image, np.array(record.abnormal, dtype=np.float32)


def augmented(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    transform = seed_002_augmentation()
    transform.set_random_state(seed=int(rng.integers(0, 2**31)))
    out = transform(torch.from_numpy(image))
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)
